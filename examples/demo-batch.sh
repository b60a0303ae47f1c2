#!/usr/bin/env bash
# The main job, end to end: a batch job that outlives its wall time, on a real Slurm running on this machine.
#
#   make demo            (or: bash examples/demo-batch.sh, after make install)
#
# An unmodified C program whose work takes ~3.5 minutes is submitted with a 2-minute limit:
#   hpcckpt sbatch --config configs/demo-batch.yaml --time=2 job.sh
# It is checkpointed every 45 s and ~20 s before its limit; it then requeues itself (scontrol requeue), the next
# run restarts from the newest checkpoint, and so on until the program ends. Its output must equal a plain run's.
# Budget: under 6 minutes on 2 cores. DEMO_DIR keeps the work directory somewhere chosen.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$here/.venv/bin:$PATH"
t0=$(date +%s)
work=${DEMO_DIR:-$(mktemp -d /tmp/hpcckpt-batch-demo.XXXXXX)}
mkdir -p "$work"
cd "$work"
steps=2100 delay_us=100000 mb=8                 # 2100 steps of 0.1 s: ~3.5 minutes of work
elapsed() { echo "$(( $(date +%s) - t0 ))s"; }
say() { printf '\n[%5s] == %s\n' "$(elapsed)" "$*"; }

say "1. a real Slurm on this machine: slurm/local-cluster.sh up (Debian's slurmctld, slurmd and munge)"
eval "$("$here/slurm/local-cluster.sh" up)"
sinfo

say "2. the workload: tests/programs/counter.c ($mb MiB of memory it mutates, an output file it appends to)"
gcc -O2 -o counter "$here/tests/programs/counter.c"
./counter plain.txt $mb $steps 0 >/dev/null
echo "plain run for reference: $(wc -l <plain.txt) lines in plain.txt"
cat >job.sh <<JOB
#!/bin/bash
#SBATCH -J hpcckpt-demo
#SBATCH -o $work/slurm-%j.out
echo "run \${SLURM_RESTART_COUNT:-0} starts on \$(hostname) at \$(date +%T)"
./counter out.txt $mb $steps $delay_us
echo "the program finished at \$(date +%T)"
JOB
chmod +x job.sh
echo "job.sh:"; sed 's/^/    /' job.sh

say "3. submit: hpcckpt sbatch --config configs/demo-batch.yaml --time=2 job.sh"
sed 's/^/    /' "$here/configs/demo-batch.yaml" | grep -v '^    #'
out=$(hpcckpt sbatch --config "$here/configs/demo-batch.yaml" --time=2 job.sh)
echo "$out"
job=$(echo "$out" | sed -n 's/.*Submitted batch job \([0-9]*\).*/\1/p')
ckdir="$work/hpcckpt-$job"

say "4. watch it: squeue, the program's progress, and the job's own log ($ckdir/hpcckpt-job.log)"
seen=0
state=PENDING
while :; do
  info=$(scontrol show job -o "$job" 2>/dev/null || true)
  state=$(echo "$info" | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
  restarts=$(echo "$info" | sed -n 's/.*Restarts=\([0-9]*\).*/\1/p')
  lines=0; [ -f out.txt ] && lines=$(wc -l <out.txt)
  runtime=$(squeue -h -j "$job" -o %M 2>/dev/null || true)
  printf '[%5s] squeue: %-10s restarts=%s  run time %-8s  program at step %4d of %d\n' "$(elapsed)" \
    "${state:-?}" "${restarts:-0}" "${runtime:--}" "$lines" "$steps"
  if [ -f "$ckdir/hpcckpt-job.log" ]; then
    n=$(wc -l <"$ckdir/hpcckpt-job.log")
    if [ "$n" -gt "$seen" ]; then
      sed -n "$((seen + 1)),${n}p" "$ckdir/hpcckpt-job.log" | grep -E "run [0-9]|checkpoint generation|deadline|requeue|restarting|ended|left before" | \
        sed 's/^/          log: /' || true
      seen=$n
    fi
  fi
  case "$state" in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE) break ;; esac
  if [ $(( $(date +%s) - t0 )) -gt 600 ]; then echo "demo: the job did not finish within 10 minutes" >&2; exit 1; fi
  sleep 10
done

say "5. the result"
echo "final state: $state after $(echo "$info" | sed -n 's/.*Restarts=\([0-9]*\).*/\1/p') requeue(s)"
hpcckpt status "$ckdir"
if [ "$state" = COMPLETED ] && cmp -s plain.txt out.txt; then
  say "OK: the job outlived its 2-minute limit and its $steps lines equal the plain run's (total $(elapsed))"
else
  say "FAILED: state $state; output differs from the plain run or is incomplete (see $ckdir/hpcckpt-job.log)" >&2
  exit 1
fi
echo "the work directory: $work   (slurm/local-cluster.sh down stops the local Slurm)"
