# Sourced, from the repository root, by the scripts that run on the GPU machine: unpacks the binaries
# that bench/cuda/make_carry.sh packed into $BIN, puts their libraries on the path, and starts
# $OUT/summary.txt for say(), which prints a line and keeps it in the summary. Set BIN and OUT first.
[ -f "$BIN/pack.tgz" ] && tar xzf "$BIN/pack.tgz" -C "$BIN" && rm "$BIN/pack.tgz"
export LD_LIBRARY_PATH=$BIN/lib:${LD_LIBRARY_PATH:-}
export DSV3_SOURCE_DIR=$PWD
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }
