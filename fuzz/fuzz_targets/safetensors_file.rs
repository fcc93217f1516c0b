//! Bytes of a safetensors file (model inputs, training data, adapter weights), as every reader
//! of one parses them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = dorac::tensors_io::parse_safetensors_typed(data, "fuzz input");
});
