#!/usr/bin/env bash
# The native engine under AddressSanitizer and UndefinedBehaviorSanitizer.
#
# Copies the checkout's kvtier/, native/ and tests/ to a scratch directory, builds
# the engine there with `native/build_engine.py --sanitize` (the checkout's own build
# is untouched), then runs the native tests and the fuzzer once per ISA variant this
# CPU runs (KVTIER_ISA=generic, avx2, ...), with the ASan runtime preloaded into the
# (unsanitized) Python. Any sanitizer report fails the run and is printed.
#
#   native/sanitize.sh                  every native test file, 5000 fuzz cases per ISA
#   native/sanitize.sh --quick          the misuse, error, serve and store tests, 500 fuzz cases per ISA (CI)
#   native/sanitize.sh --fuzz N [--seed S]   the fuzzer only, N cases per ISA
#   --reports DIR    keep the sanitizer logs, the fuzz reports (JSON) and progress files in DIR
#   --isa NAME       only this ISA variant
#
# PYTHON (default python3) must have torch, cffi and pytest. Skips, with a message and
# exit status 0, where gcc has no ASan/UBSan runtime.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
# the run changes directory into a scratch copy: a relative interpreter path (.venv/bin/python)
# must be resolved against the caller's directory first
if [[ "$py" == */* ]]; then py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")"; fi
command -v "$py" >/dev/null || { echo "sanitize: PYTHON=$py is not an executable" >&2; exit 2; }
mode=full fuzz_cases=5000 seed=1 reports= only_isa=
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) mode=quick; fuzz_cases=500 ;;
        --fuzz) mode=fuzz; fuzz_cases="$2"; shift ;;
        --seed) seed="$2"; shift ;;
        --reports) reports="$(mkdir -p "$2" && cd "$2" && pwd)"; shift ;;
        --isa) only_isa="$2"; shift ;;
        *) echo "usage: $0 [--quick | --fuzz N] [--seed S] [--reports DIR] [--isa NAME]" >&2; exit 2 ;;
    esac
    shift
done

cc="$("$py" -c 'import sysconfig; print((sysconfig.get_config_var("CC") or "gcc").split()[0])')"
asan="$("$cc" -print-file-name=libasan.so 2>/dev/null || true)"
ubsan="$("$cc" -print-file-name=libubsan.so 2>/dev/null || true)"
# preloaded too: ASan intercepts __cxa_throw, and finds the real one only if libstdc++ is loaded
# when it starts (torch throws C++ exceptions; python itself does not link libstdc++)
cxx="$("$cc" -print-file-name=libstdc++.so.6 2>/dev/null || true)"
if [[ "$asan" != /* || ! -e "$asan" || "$ubsan" != /* || ! -e "$ubsan" || "$cxx" != /* ]]; then
    echo "sanitize: skipped: $cc has no ASan/UBSan runtime (libasan.so, libubsan.so); install gcc's libasan and libubsan"
    exit 0
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/kvtier-sanitize.XXXXXX")"
trap 'rm -rf "$work"' EXIT
(cd "$root" && tar cf - --exclude=__pycache__ --exclude='*.so' kvtier native tests pyproject.toml setup.py) \
    | tar xf - -C "$work"
echo "sanitize: building the engine with -fsanitize=address,undefined in $work"
(cd "$work" && "$py" native/build_engine.py --sanitize)

reports="${reports:-$work/reports}"
mkdir -p "$reports"
# Leaks are Python's own at exit; an allocation the OS refuses is an error the engine reports
# (NativeMemoryError), not a sanitizer finding. Reports go to files, one per process.
export LD_PRELOAD="$asan:$cxx${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:log_path=$reports/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$reports/ubsan"
export PYTHONPATH="$work" PYTHONDONTWRITEBYTECODE=1
cd "$work"  # the scratch copy's kvtier comes first on sys.path

isas="$(env -u KVTIER_ISA "$py" -c 'import kvtier._native as N; print(" ".join(n for n in N.ISA_NAMES if N.isa_supported(n)))')"
if [[ -n "$only_isa" ]]; then
    [[ " $isas " == *" $only_isa "* ]] || { echo "sanitize: $only_isa: this CPU runs [$isas]" >&2; exit 2; }
    isas="$only_isa"
fi
if [[ "$mode" == quick ]]; then
    tests=(tests/test_native_misuse.py tests/test_native_errors.py tests/test_native_serve.py tests/test_native_store.py)
else
    tests=(tests/test_native_*.py)
fi
status=0 runs=0
for isa in $isas; do
    if [[ "$mode" != fuzz ]]; then
        echo "sanitize: KVTIER_ISA=$isa pytest ${tests[*]}"
        KVTIER_ISA="$isa" "$py" -m pytest -q -p no:cacheprovider -x "${tests[@]}" || status=1
        runs=$((runs + 1))
    fi
    echo "sanitize: KVTIER_ISA=$isa fuzz $fuzz_cases cases (seed $seed)"
    KVTIER_ISA="$isa" "$py" tests/native_fuzz.py --cases "$fuzz_cases" --seed "$seed" --isa current \
        --progress "$reports/progress.$isa" --report "$reports/fuzz.$isa.json" || status=1
    runs=$((runs + 1))
done

# A report is an error (ASan's "ERROR:", a failed CHECK, UBSan's "runtime error"); the warnings
# that allocator_may_return_null prints for allocations refused on purpose are counted apart.
n_reports=0 n_refused=0
for f in "$reports"/asan.* "$reports"/ubsan.*; do
    [[ -e "$f" ]] || continue
    if grep -q -E "ERROR: |CHECK failed|runtime error" "$f"; then
        n_reports=$((n_reports + 1))
        echo "=== sanitizer report $f"
        cat "$f"
    else
        n_refused=$((n_refused + $(grep -c "failed to allocate" "$f" || true)))
    fi
done
if [[ $status -ne 0 ]]; then
    for f in "$reports"/progress.*; do echo "last case run: $(tail -1 "$f") ($f)"; done
fi
echo "sanitize: $runs runs over ISAs [$isas], $n_reports sanitizer reports ($n_refused allocations past memory" \
    "refused, as the tests ask), exit status $status"
[[ $n_reports -eq 0 && $status -eq 0 ]]
