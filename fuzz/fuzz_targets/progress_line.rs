//! The `##kiln[progress ...]` line a job step prints: any line is a report or not,
//! and a report's percent is within 0..=100 and its states within their length bound.

#![no_main]

use kiln_proto::progress::{parse_progress_line, MAX_PROGRESS_VALUE_CHARS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The client reads a step's output lossily, so every byte string is a line.
    let line = String::from_utf8_lossy(data);
    let Some(progress) = parse_progress_line(&line) else {
        return;
    };
    if let Some(percent) = progress.percent {
        assert!(percent <= 100, "percent {percent} from {line:?}");
    }
    for value in [&progress.major, &progress.minor].into_iter().flatten() {
        assert!(
            value.chars().count() <= MAX_PROGRESS_VALUE_CHARS,
            "{} characters kept from {line:?}",
            value.chars().count()
        );
    }
});
