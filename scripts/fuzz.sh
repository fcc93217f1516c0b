#!/usr/bin/env bash
# The fuzzing campaign: each cargo-fuzz target (fuzz/fuzz_targets/) for RUNS executions (default
# 1M) or SECONDS, seeded from the bundled models, the conformance cases' models and the data,
# with ONNX field keys as a dictionary for the ONNX target. A crash, a timeout (> 1 s per input)
# or an allocation over 2 GB stops the target and leaves its input in fuzz/artifacts/<target>/:
# turn it into a regression test.
#
# Usage: scripts/fuzz.sh [TARGET...]   (default: every target)
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${RUNS:-1000000}"
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    targets=(onnx_pipeline safetensors_file peft_adapter training_data)
fi

seed() {
    local target=$1 dir="fuzz/corpus/$1"
    mkdir -p "$dir"
    case $target in
        onnx_pipeline)
            find models -name '*.onnx' -size -512k -exec cp {} "$dir/" \;
            # Every op's importer, from the conformance cases (If, quantizers, pools...).
            for m in tests/conformance/*/model.onnx; do
                cp "$m" "$dir/$(basename "$(dirname "$m")").onnx"
            done ;;
        safetensors_file | training_data)
            find models -name '*.safetensors' -size -256k -exec cp {} "$dir/" \; ;;
        peft_adapter)
            # config, a 0xFF separator, then the weights (the target's input format)
            for a in models/*/peft_* models/shift/peft_dora; do
                [[ -f $a/adapter_config.json ]] || continue
                { cat "$a/adapter_config.json"; printf '\xff'; cat "$a/adapter_model.safetensors"; } \
                    > "$dir/$(echo "$a" | tr / _)"
            done ;;
    esac
}

failed=0
for t in "${targets[@]}"; do
    seed "$t"
    dict=()
    [[ $t == onnx_pipeline ]] && dict=(-dict=fuzz/onnx.dict)
    limit=(-runs="$runs")
    [[ -n ${SECONDS_PER_TARGET:-} ]] && limit=(-max_total_time="$SECONDS_PER_TARGET")
    echo "== $t"
    log="fuzz/logs/$t.log"
    mkdir -p fuzz/logs
    if cargo +nightly fuzz run -O "$t" "fuzz/corpus/$t" -- \
        "${limit[@]}" -timeout=1 -rss_limit_mb=2048 -malloc_limit_mb=2048 "${dict[@]}" \
        -print_final_stats=1 > "$log" 2>&1; then
        status=ok
    else
        status=FAILED
        failed=1
    fi
    grep -E 'stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY|Test unit written' "$log" || true
    echo "$t: $status (full log: $log)"
done
exit "$failed"
