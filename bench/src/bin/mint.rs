//! Mints a connection token for the benches, as an application's backend
//! would: `sub` `bench`, `exp` an hour away, grants `subscribe` and
//! `publish` `*`.
//!
//! ```text
//! mint hs256 <secret>
//! mint es256 <PEM private key file>
//! ```

use anyhow::{bail, Context};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (alg, key) = match args.as_slice() {
        [alg, key] if alg == "hs256" => (Algorithm::HS256, EncodingKey::from_secret(key.as_bytes())),
        [alg, path] if alg == "es256" => {
            let pem = std::fs::read(path).with_context(|| format!("cannot read {path}"))?;
            (Algorithm::ES256, EncodingKey::from_ec_pem(&pem)?)
        }
        _ => bail!("usage: mint hs256 <secret> | mint es256 <PEM private key file>"),
    };
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + 3600;
    let claims = serde_json::json!({"sub": "bench", "exp": exp, "subscribe": ["*"], "publish": ["*"]});
    println!("{}", encode(&Header::new(alg), &claims, &key)?);
    Ok(())
}
