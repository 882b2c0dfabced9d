//! Live progress on standard error: an indicatif line on a terminal, a
//! plain line per phase and every few seconds otherwise.

use std::cell::{Cell, RefCell};
use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::stats::Live;

#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    quiet: bool,
    phase: Cell<&'static str>,
    last_line: Cell<Option<Instant>>,
    label: RefCell<String>,
    /// When the timed part of the run began, and how long it lasts
    /// (warm-up, measurement and drain; a hold).
    timed: Cell<Option<(Instant, Duration)>>,
}

impl Progress {
    pub fn new(quiet: bool) -> Progress {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}").unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        Progress {
            bar,
            quiet,
            phase: Cell::new("start"),
            last_line: Cell::new(None),
            label: RefCell::new(String::new()),
            timed: Cell::new(None),
        }
    }

    /// The timed part of the run starts now and lasts `total`: progress
    /// then shows the time elapsed of it and its total.
    pub fn timed(&self, total: Duration) {
        self.timed.set(Some((Instant::now(), total)));
    }

    /// Names the run in progress lines (for `compare`).
    pub fn label(&self, label: &str) {
        *self.label.borrow_mut() = label.to_string();
        // A new run: its own clock starts with its timed part.
        self.timed.set(None);
    }

    pub fn phase(&self, phase: &'static str) {
        self.phase.set(phase);
        if self.bar.is_none() && !self.quiet {
            eprintln!("{}phase: {phase}", self.prefix());
        }
        self.line_now();
    }

    fn prefix(&self) -> String {
        let l = self.label.borrow();
        if l.is_empty() {
            String::new()
        } else {
            format!("[{l}] ")
        }
    }

    pub fn note(&self, text: &str) {
        match &self.bar {
            Some(b) => b.println(format!("note: {text}")),
            None if !self.quiet => eprintln!("{}note: {text}", self.prefix()),
            None => {}
        }
    }

    pub fn tick(&self, live: &Live, subscribers: u64, p99_us: f64) {
        if self.quiet {
            return;
        }
        let clock = match self.timed.get() {
            Some((from, total)) => format!("{:>5.1} s / {:.0} s  ", from.elapsed().as_secs_f64(), total.as_secs_f64()),
            None => String::new(),
        };
        let p99 = if p99_us > 0.0 { format!("  p99 {}", crate::report::us(p99_us)) } else { String::new() };
        let msg = format!(
            "{}{clock}{:<8} connections {}/{}  sent {}  received {}{p99}",
            self.prefix(),
            self.phase.get(),
            live.connected.load(Ordering::Relaxed),
            subscribers,
            live.sent.load(Ordering::Relaxed),
            live.received.load(Ordering::Relaxed),
        );
        match &self.bar {
            Some(b) => b.set_message(msg),
            None => {
                let now = Instant::now();
                if self.last_line.get().is_none_or(|t| now.duration_since(t) >= Duration::from_secs(5)) {
                    self.last_line.set(Some(now));
                    eprintln!("{msg}");
                }
            }
        }
    }

    /// Prints the next line now (without a terminal), as a phase starts.
    fn line_now(&self) {
        self.last_line.set(None);
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
