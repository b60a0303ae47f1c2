#!/usr/bin/env bash
# The main job, end to end on this machine (coordinator on localhost, no scheduler):
# an unmodified C program with a 64 MiB heap buffer and an open output file is launched under hpcckpt,
# checkpointed twice while it runs, killed, restarted from the restart script, and its output is compared
# with a plain run of the same program. Run via `make demo`.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$here/.venv/bin:$PATH"
work=${DEMO_DIR:-$(mktemp -d /tmp/hpcckpt-demo.XXXXXX)}
mkdir -p "$work"
cd "$work"
export HPCCKPT_RUNDIR="$work/run"
steps=600 mb=64

echo "== building the workload (tests/programs/counter.c) in $work"
gcc -O2 -o counter "$here/tests/programs/counter.c"

echo "== plain run, for reference"
./counter plain.txt $mb $steps 0 >/dev/null

echo "== dmtcp_launch ./counter (coordinator started automatically on a random local port)"
dmtcp_launch -p 0 --port-file port --ckptdir "$work" ./counter out.txt $mb $steps 10000 >launch.out 2>launch.err &
launch=$!
while [ ! -s port ]; do sleep 0.1; done
sleep 1
for i in 1 2; do
  echo "== dmtcp_command --bcheckpoint (round $i) at step $(wc -l <out.txt)"
  dmtcp_command --port-file port --bcheckpoint
  sleep 0.5
done
dmtcp_command --port-file port --status
echo "== killing the computation at step $(wc -l <out.txt)"
dmtcp_command --port-file port --kill
wait $launch || true

image=$(ls ckpt_*/gen*/ckpt_counter_*.dmtcp | tail -1)
echo "== the newest image:"
hpcckpt inspect "$image" | head -8

echo "== restarting with ./dmtcp_restart_script.sh"
start=$(date +%s.%N)
bash ./dmtcp_restart_script.sh --coord-port 0 >restart.out 2>restart.err
end=$(date +%s.%N)
echo "restarted run finished in $(echo "$end - $start" | bc) s (restart log: $work/restart.err)"

if cmp -s plain.txt out.txt; then
  echo "== OK: all $steps lines after checkpoint/kill/restart equal the plain run's"
else
  echo "== FAILED: output differs from the plain run" >&2
  diff <(head -c 2000 plain.txt) <(head -c 2000 out.txt) | head >&2
  exit 1
fi
