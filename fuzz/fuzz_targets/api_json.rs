//! The JSON bodies clients and operators send to the server's API. The first byte
//! chooses the type; the rest is the body. Deserialising must never panic, and a body
//! that deserialises must serialise and deserialise again.

#![no_main]

use kiln_blob::wire::{CommitRequest, FetchRequest, MissingRequest};
use kiln_proto::api::{ClaimRequest, Fail, Finish, Heartbeat, LogBatch};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

fn check<T: DeserializeOwned + Serialize>(body: &[u8]) {
    let Ok(value) = serde_json::from_slice::<T>(body) else {
        return;
    };
    let json = serde_json::to_vec(&value).expect("a deserialised body serialises");
    let again: T = serde_json::from_slice(&json).expect("a serialised body deserialises");
    assert_eq!(
        serde_json::to_vec(&again).expect("serialises"),
        json,
        "a body changes on its second round trip"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    match selector % 8 {
        0 => check::<ClaimRequest>(body),
        1 => check::<Heartbeat>(body),
        2 => check::<LogBatch>(body),
        3 => check::<Fail>(body),
        4 => check::<Finish>(body),
        5 => check::<MissingRequest>(body),
        6 => check::<CommitRequest>(body),
        _ => check::<FetchRequest>(body),
    }
});
