//! Keeping log lines clear of the PyWorker's fatal markers.
//!
//! The PyWorker that fronts this server reads its log and declares the worker broken when a
//! line contains `Traceback (most recent call last):`, `Error:`, `CUDA error`, `RuntimeError:`
//! or `OutOfMemoryError` (case-sensitive, anywhere in the line). Text that comes from outside
//! (HTTP client errors, orchestrator answers) or from error types goes through [`scrub`] before
//! it is logged, unless the process is failing for good.

/// The markers, as the PyWorker matches them.
pub const FATAL_MARKERS: [&str; 5] = [
    "Traceback (most recent call last):",
    "Error:",
    "CUDA error",
    "RuntimeError:",
    "OutOfMemoryError",
];

/// `s` with every fatal marker defused (and on one line).
pub fn scrub(s: &str) -> String {
    let mut out = s.replace(['\n', '\r'], " ");
    for (from, to) in [
        ("Traceback (most recent call last):", "traceback:"),
        ("OutOfMemoryError", "out-of-memory condition"),
        ("CUDA error", "cuda failure"),
        ("Error:", " error -"),
    ] {
        out = out.replace(from, to);
    }
    out
}

/// Whether a line would be taken for a fatal error.
pub fn is_fatal_looking(line: &str) -> bool {
    FATAL_MARKERS.iter().any(|m| line.contains(m))
}

/// The first 16 characters, as the reference logs keys and hashes.
pub fn prefix16(s: &str) -> &str {
    match s.char_indices().nth(16) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_defuses_every_marker() {
        for m in FATAL_MARKERS {
            let s = scrub(&format!("a {m} b\nc"));
            assert!(!is_fatal_looking(&s), "{s}");
            assert!(!s.contains('\n'));
        }
        assert!(!is_fatal_looking(&scrub(
            "hyper::Error: IncompleteMessage, RuntimeError: x"
        )));
        assert_eq!(scrub("connection refused"), "connection refused");
    }
}
