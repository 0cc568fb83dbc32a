#!/usr/bin/env bash
# Old name of the one prepared GPU run; kept as an alias of scripts/gpu_bench.sh (see its header).
exec bash "$(dirname "$0")/gpu_bench.sh" "$@"
