#!/usr/bin/env bash
# Where a worker benchmark case misses the cache, per source line: callgrind's cache simulation over
# the measured iterations only (not the setup), each instruction's misses attributed to its source
# line and the chain of functions inlined into it (addr2line -i). The simulated last level is the L2
# by default, since lb-core's per-packet reads are sized against it. The simulation has no hardware
# prefetcher: a miss it counts may cost nothing on a real core (BENCHMARKS.md, lb-core, session 17).
# It also ignores prefetch instructions (checked with a C loop: the same misses with and without
# _mm_prefetch), so since the warm-up prefetches (session 18) a line's miss is counted where the
# decision first reads it, not in the warm-up round that brought it in: the total per packet still
# counts the lines that missed, but their place is the reader's. Session 17's table predates this.
#
# Usage: scripts/cache-misses.sh CASE [TOP] [EVENT]
#   CASE   a worker_hugepages case, e.g. 'worker_new_flows_hugepages/dsr_syn/100000_services'
#   TOP    how many instructions to list (default 15)
#   EVENT  DLmr (last-level read misses, default), D1mr (L1 read misses) or Ir (instructions)
# L1=size,assoc,line and LL=size,assoc,line set the simulated caches (default 48 KiB L1d, 2 MiB LL).
# Needs valgrind and binutils (addr2line). Prints the event per packet (a burst is 64 packets).
set -euo pipefail
cd "$(dirname "$0")/.."

CASE=${1:?usage: scripts/cache-misses.sh CASE [TOP] [EVENT]}
TOP=${2:-15}
EVENT=${3:-DLmr}
L1=${L1:-49152,12,64}
LL=${LL:-2097152,16,64}
for tool in valgrind addr2line python3; do
    command -v "$tool" > /dev/null || { echo "cache-misses.sh: needs $tool" >&2; exit 2; }
done

cargo bench -q -p lb-benches --bench worker_hugepages --no-run 2> /dev/null
BIN=$(ls -t target/release/deps/worker_hugepages-* | grep -v '\.d$' | head -1)
OUT=$(mktemp /tmp/cache-misses.XXXXXX)
trap 'rm -f "$OUT"' EXIT

valgrind --tool=callgrind --cache-sim=yes --D1="$L1" --LL="$LL" --dump-instr=yes \
    --toggle-collect='*Bencher*iter*' --callgrind-out-file="$OUT" \
    "$BIN" --bench "$CASE" --profile-time 2 > /dev/null 2>&1

python3 - "$OUT" "$BIN" "$EVENT" "$TOP" <<'EOF'
import collections, re, subprocess, sys

path, binary, event, top = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
per_instr = collections.Counter()
names, column, last, after_call, bursts, caller, callee = {}, None, 0, False, 0, '', ''
for line in open(path):
    line = line.rstrip('\n')
    if line.startswith('events:'):
        column = line.split()[1:].index(event)
        continue
    m = re.match(r'^(c?fn)=\((\d+)\)(?: (.*))?$', line)
    if m:
        if m.group(3):
            names[m.group(2)] = m.group(3)
        if m.group(1) == 'fn':
            caller = names.get(m.group(2), '')
        else:
            callee = names.get(m.group(2), '')
        continue
    if line.startswith('calls='):
        after_call = True
        # Bursts: calls of process_burst from outside it (the benchmark's iterations).
        if 'process_burst' in callee and 'process_burst' not in caller:
            bursts += int(line.split()[0][len('calls='):])
        continue
    parts = line.split()
    if not parts or not re.match(r'^(0x[0-9a-f]+|[+-]\d+|\*)$', parts[0]):
        continue
    at = parts[0]
    last = int(at, 16) if at.startswith('0x') else last if at == '*' else last + int(at)
    if after_call:  # the inclusive cost of a call, counted where it is spent
        after_call = False
        continue
    values = parts[2:]
    if column is not None and len(values) > column:
        per_instr[last] += int(values[column])
packets = bursts * 64
if packets == 0:
    sys.exit('cache-misses.sh: no process_burst call was measured (is CASE right?)')
total = sum(per_instr.values())
print(f'{event} per packet: {total / packets:.2f} ({packets} packets)')
for address, count in per_instr.most_common(top):
    out = subprocess.run(['addr2line', '-i', '-f', '-C', '-e', binary, hex(address)],
                         capture_output=True, text=True).stdout.split('\n')
    chain = [f"{out[i].split('::')[-1]}@{out[i + 1].split('/')[-1]}" for i in range(0, len(out) - 1, 2)]
    print(f'{count / packets:7.3f}  {" < ".join(chain[:5])}')
EOF
