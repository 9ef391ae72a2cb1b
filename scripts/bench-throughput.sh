#!/usr/bin/env bash
# Throughput and latency of one forwarding core, three ways, in the same run, on the same namespaces,
# generator and pinned cores:
#   (a) floor: a bare AF_XDP receive -> MAC rewrite -> transmit loop (lb bench-forward --processor floor)
#   (b) lb:    the load balancer, Maglev + conntrack + full NAT       (lb bench-forward --processor lb)
#   (c) nft:   the kernel doing the same job with nftables DNAT + SNAT (kube-proxy's nftables mode)
# The generator (lb bench-gen, AF_XDP, 60-byte UDP, many flows, send timestamp in the payload) runs on
# GEN_CORE; the forwarder and the LB interface's threaded NAPI run on FWD_CORE. Offered load is "as
# fast as the generator can"; latency is measured in a second pass at a fixed, light rate.
# Only traffic between two namespaces this script makes (10.78.0.0/24); everything is removed on exit.
# Needs root, iproute2, nftables. Usage: scripts/bench-throughput.sh [seconds per pass]
# ROUNDS=n repeats (a), (b), (c) n times in turn (default 1) and prints every round and the medians:
# the run-to-run spread on a shared forwarding core is +-20 %, so compare medians of several rounds.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${1:-5}
ROUNDS=${ROUNDS:-1}
[ "$SECS" -ge 2 ] || { echo "seconds per run must be at least 2 (1 s warm-up + the window)" >&2; exit 2; }
GEN_CORE=${GEN_CORE:-0}
FWD_CORE=${FWD_CORE:-1}
LAT_RATE=${LAT_RATE:-20000}
# Core of the LB interface's NAPI thread (the kernel's receive work, and all of nftables' work).
NAPI_CORE=${NAPI_CORE:-$FWD_CORE}
# Extra arguments: FWD_ARGS for every bench-forward (e.g. "--frames 16384 --fill-ring 8192 --tx-ring 512
# --tx-budget 128 --send-buffer 4194304 --spin"; the defaults are lb-io's XskConfig::new), GEN_MAX_ARGS
# for the generator's full-speed pass. By default that pass drops the returning frames in g0's XDP
# program (--drop-returns): receiving them into the generator's socket costs the generator's core
# more than the forwarder spends on them, and the figure then measures that core.
FWD_ARGS=${FWD_ARGS:-}
GEN_MAX_ARGS=${GEN_MAX_ARGS:---drop-returns}
# Nice value of the forwarder, which shares FWD_CORE with l0's NAPI thread (nice 0). At equal weight
# the NAPI thread takes ~60 % of the core and keeps receiving frames the forwarder has no time to
# send (fill-ring-empty drops after the kernel's receive work). FWD_NICE=-5 was tried: no clear gain
# within the run-to-run spread (BENCHMARKS.md), so the default stays 0.
FWD_NICE=${FWD_NICE:-0}
# Nice value of the generator, which shares GEN_CORE with g0's NAPI thread (nice 0): a spinning
# generator at equal weight starves g0's NAPI, the returning frames back up into l0's transmit path,
# and the figure measures the generator's core instead of the forwarding one.
GEN_NICE=${GEN_NICE:-10}
# BUSY_POLL=1: the forwarder spins and asks for busy polling (SO_PREFER_BUSY_POLL, SO_BUSY_POLL_BUDGET),
# with l0's napi_defer_hard_irqs / gro_flush_timeout set. On Linux >= 6.13 this is a no-op for a
# copy-mode socket: the kernel gives an AF_XDP socket a NAPI id at bind time for zero-copy only, and
# busy polling needs one (bench-forward prints napi_id; on veth it stays "none").
BUSY_POLL=${BUSY_POLL:-0}
BUSY=""; [ "$BUSY_POLL" = 1 ] && BUSY="--busy-poll"
DEFER_IRQS=${DEFER_IRQS:-2}
GRO_FLUSH_NS=${GRO_FLUSH_NS:-200000}
TAG="lbb$$"
G="${TAG}g"; L="${TAG}l"
VIP=10.78.0.100; BACKEND=10.78.0.50; SNAT=10.78.0.3; CLIENT=10.78.0.1

# LB_BIN=path: use an already built `lb` instead of building it here.
if [ -n "${LB_BIN:-}" ]; then
  LB=$(realpath "$LB_BIN")
else
  cargo build --release -q -p lb-examples --bin lb
  LB="$PWD/target/release/lb"
fi

FWD_PID=""
cleanup() {
  [ -n "$FWD_PID" ] && kill "$FWD_PID" 2>/dev/null && wait "$FWD_PID" 2>/dev/null || true
  ip netns del "$G" 2>/dev/null || true
  ip netns del "$L" 2>/dev/null || true
  rm -f "/tmp/$TAG.yaml" "/tmp/$TAG.win" "/tmp/$TAG.fwd"
}
trap cleanup EXIT INT TERM

ip netns add "$G"; ip netns add "$L"
for ns in "$G" "$L"; do ip -n "$ns" link set lo up; done
ip -n "$G" link add g0 type veth peer name l0 netns "$L"
ip -n "$G" addr add $CLIENT/24 dev g0; ip -n "$L" addr add 10.78.0.2/24 dev l0
ip -n "$G" link set g0 up; ip -n "$L" link set l0 up
ip netns exec "$G" ethtool -K g0 tx off >/dev/null
ip netns exec "$L" ethtool -K l0 tx off >/dev/null
GMAC=$(ip netns exec "$G" cat /sys/class/net/g0/address)
LMAC=$(ip netns exec "$L" cat /sys/class/net/l0/address)
ip -n "$L" neigh replace $BACKEND lladdr "$GMAC" dev l0 nud permanent

# Threaded NAPI for both veth ends, pinned: the LB side's with the forwarder, the generator's with it.
napi() { # ns dev core
  ip netns exec "$1" sh -c "echo 1 > /sys/class/net/$2/threaded" 2>/dev/null \
    || { echo "  warning: $2 has no NAPI to thread (its receive runs as softirq where it is raised)" >&2; return 0; }
  for pid in $(pgrep -f "napi/$2-" || true); do taskset -pc "$3" "$pid" >/dev/null || true; done
}

# g0's NAPI can only be made threaded once the generator has attached its XDP program (veth has no
# NAPI before; the sysfs write fails). Without it, g0's receive work (the generator's return traffic,
# redirected and copied into its socket) runs as softirq inside the forwarder's own sendto, on the
# forwarder's core, and is charged to the path under test.
gen() { # rate receive-address
  local gpid rc=0 extra=""
  [ "$1" = 0 ] && extra=$GEN_MAX_ARGS
  # shellcheck disable=SC2086
  ip netns exec "$G" nice -n "$GEN_NICE" "$LB" --log warn bench-gen --iface g0 --core "$GEN_CORE" --dst-mac "$LMAC" \
    --src-ip $CLIENT --dst-ip $VIP --flows 1024 --rate "$1" --duration "$SECS" --receive "$2" $extra &
  gpid=$!
  for _ in $(seq 200); do ip -n "$G" link show g0 | grep -q xdp && break; sleep 0.01; done
  napi "$G" g0 "$GEN_CORE"
  # At full speed, sample l0's TX counter over a window inside the generator's steady state: from
  # 1 s after it attached (its own warm-up is 0.5 s) to SECS s after (it stops at SECS + 0.5 s).
  # The same window and the same counter for (a), (b) and (c).
  if [ "$1" = 0 ]; then
    local tx0 t0 tx1 t1
    sleep 1; tx0=$(l0_tx); t0=$(now)
    # PERF_DIR=dir: a diagnostic run also records the forwarding core's call graphs over the window.
    [ -n "${PERF_DIR:-}" ] && perf record -q -g -C "$FWD_CORE" -o "$PERF_DIR/$CASE.data" -- sleep "$((SECS - 1))" 2>/dev/null &
    sleep "$((SECS - 1))"; tx1=$(l0_tx); t1=$(now)
    kill -0 "$gpid" 2>/dev/null || echo "  warning: the generator ended inside the window" >&2
    echo "$tx0 $t0 $tx1 $t1" > "/tmp/$TAG.win"
  fi
  wait "$gpid" || rc=$?
  return $rc
}

start_fwd() { # args...
  # shellcheck disable=SC2086
  ip netns exec "$L" nice -n "$FWD_NICE" "$LB" --log warn bench-forward --iface l0 --core "$FWD_CORE" $BUSY $FWD_ARGS "$@" > "/tmp/$TAG.fwd" 2>&1 &
  FWD_PID=$!
  for _ in $(seq 100); do grep -q ready "/tmp/$TAG.fwd" 2>/dev/null && break; sleep 0.05; done
  napi "$L" l0 "$NAPI_CORE"
}
stop_fwd() { kill -INT "$FWD_PID"; wait "$FWD_PID" || true; FWD_PID=""; cat "/tmp/$TAG.fwd" >&2; }

field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p"; }
l0_tx() { ip netns exec "$L" cat /sys/class/net/l0/statistics/tx_packets; }
now() { date +%s.%N; }
declare -A PPS RET P50 P99

# Forwarded pps = frames the LB namespace transmitted on l0 per second over the window above (what g0
# took from l0); offered pps = what the generator sent over its own measuring window.
run_case() { # name receive-address
  local out lat
  CASE=$1
  out=$(gen 0 "$2"); echo "  $1 max:      $out" >&2
  PPS[$1]=$(awk '{ printf "%.0f", ($3 - $1) / ($4 - $2) }' "/tmp/$TAG.win")
  RET[$1]=$(echo "$out" | field tx_pps)
  lat=$(gen "$LAT_RATE" "$2"); echo "  $1 ${LAT_RATE}pps: $lat" >&2
  P50[$1]=$(echo "$lat" | field p50_us); P99[$1]=$(echo "$lat" | field p99_us)
}

# l0's NAPI deferral (sysfs of the namespace's own veth, gone with it): with busy polling, a NAPI
# poll that finds nothing keeps the NAPI masked for up to GRO_FLUSH_NS instead of re-arming it, so
# the peer's transmits do not wake l0's NAPI thread while the forwarder polls it itself.
napi_defer() { # defer-hard-irqs gro-flush-timeout-ns
  ip netns exec "$L" sh -c "echo $1 > /sys/class/net/l0/napi_defer_hard_irqs && echo $2 > /sys/class/net/l0/gro_flush_timeout"
}
if [ "$BUSY_POLL" = 1 ]; then
  # veth registers a queue's XDP info with the NAPI id it has at attach time, and its NAPI only exists
  # before an XDP program attaches when GRO is on. Without this the socket never learns a NAPI id
  # (SO_INCOMING_NAPI_ID 0) and every busy poll is a no-op.
  ip netns exec "$L" ethtool -K l0 gro on >/dev/null
  napi "$L" l0 "$NAPI_CORE"
  napi_defer "$DEFER_IRQS" "$GRO_FLUSH_NS"
fi

cat > "/tmp/$TAG.yaml" <<YAML
node:
  local_mac: "$LMAC"
  gateway_mac: "$GMAC"
  snat_v4: $SNAT
services:
  - name: bench
    vip: $VIP
    port: 80
    protocol: udp
    scheduler: mh
    mode: nat
    backends:
      - { addr: $BACKEND, port: 80, weight: 1, mac: "$GMAC" }
YAML

case_floor() {
  echo "== (a) floor: AF_XDP receive, MAC rewrite, transmit" >&2
  start_fwd --processor floor --dst-mac "$GMAC" --steer $VIP
  run_case floor $VIP; stop_fwd
}

case_lb() {
  echo "== (b) load balancer: Maglev + conntrack + NAT" >&2
  if start_fwd --processor lb --config "/tmp/$TAG.yaml" --steer $VIP --steer $SNAT && sleep 0.2 && kill -0 "$FWD_PID" 2>/dev/null; then
    run_case lb $BACKEND; stop_fwd
  else
    echo "  (b) not available in this build:" >&2; cat "/tmp/$TAG.fwd" >&2; FWD_PID=""; PPS[lb]=0; RET[lb]=0; P50[lb]=0; P99[lb]=0
  fi
}

case_nft() {
  echo "== (c) kernel: nftables DNAT + SNAT, forwarding" >&2
  ip netns exec "$L" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.l0.send_redirects=0
  ip netns exec "$L" nft -f - <<NFT
table ip lbbench {
  chain pre { type nat hook prerouting priority -100; ip daddr $VIP udp dport 80 dnat to $BACKEND; }
  chain post { type nat hook postrouting priority 100; ip daddr $BACKEND snat to $SNAT; }
}
NFT
  # Without an XDP program veth has no NAPI unless GRO is on; with it, l0's receive and the forwarding
  # run in l0's NAPI thread on NAPI_CORE like (a) and (b), instead of in the generator's sendto on GEN_CORE.
  ip netns exec "$L" ethtool -K l0 gro on >/dev/null
  napi "$L" l0 "$NAPI_CORE"
  # No socket polls l0 here: its NAPI runs as the kernel arms it (NFT_DEFER="2 200000" to try deferral).
  napi_defer ${NFT_DEFER:-0 0}
  run_case nft $BACKEND
  # Back to the state (a) and (b) start from, for the next round.
  ip netns exec "$L" nft delete table ip lbbench
  ip netns exec "$L" sysctl -qw net.ipv4.ip_forward=0
  napi_defer 0 0
  [ "$BUSY_POLL" = 1 ] || ip netns exec "$L" ethtool -K l0 gro off >/dev/null
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
median() { printf "%s\n" "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
declare -a ROWS RA RC FL LB_ NF
for round in $(seq "$ROUNDS"); do
  [ "$ROUNDS" -gt 1 ] && echo "==== round $round of $ROUNDS" >&2
  case_floor; case_lb; case_nft
  ROWS+=("| $round | ${PPS[floor]} | ${PPS[lb]} | ${PPS[nft]} | $(ratio "${PPS[lb]}" "${PPS[floor]}") | $(ratio "${PPS[lb]}" "${PPS[nft]}") | ${P50[lb]} / ${P99[lb]} | ${P50[nft]} / ${P99[nft]} |")
  RA+=("$(ratio "${PPS[lb]}" "${PPS[floor]}")"); RC+=("$(ratio "${PPS[lb]}" "${PPS[nft]}")")
  FL+=("${PPS[floor]}"); LB_+=("${PPS[lb]}"); NF+=("${PPS[nft]}")
done

echo
echo "machine: $(uname -r), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "command: ROUNDS=$ROUNDS scripts/bench-throughput.sh $SECS   (GEN_CORE=$GEN_CORE FWD_CORE=$FWD_CORE NAPI_CORE=$NAPI_CORE FWD_ARGS=\"$FWD_ARGS\" GEN_MAX_ARGS=\"$GEN_MAX_ARGS\" FWD_NICE=$FWD_NICE GEN_NICE=$GEN_NICE BUSY_POLL=$BUSY_POLL DEFER_IRQS=$DEFER_IRQS GRO_FLUSH_NS=$GRO_FLUSH_NS NFT_DEFER=${NFT_DEFER:-0 0} LAT_RATE=$LAT_RATE)"
if [ "$ROUNDS" = 1 ]; then
  printf "| path | forwarded pps (one core) | offered pps | p50 us @%s pps | p99 us @%s pps |\n|---|---|---|---|---|\n" "$LAT_RATE" "$LAT_RATE"
  for k in floor lb nft; do printf "| %s | %s | %s | %s | %s |\n" "$k" "${PPS[$k]}" "${RET[$k]}" "${P50[$k]}" "${P99[$k]}"; done
  echo "(b)/(a) = $(ratio "${PPS[lb]}" "${PPS[floor]}")   (b)/(c) = $(ratio "${PPS[lb]}" "${PPS[nft]}")"
else
  printf "| round | (a) floor | (b) lb | (c) nft | (b)/(a) | (b)/(c) | p50 / p99 us @%s pps (b) | (c) |\n|---|---|---|---|---|---|---|---|\n" "$LAT_RATE"
  printf "%s\n" "${ROWS[@]}"
  echo "| median | $(median "${FL[@]}") | $(median "${LB_[@]}") | $(median "${NF[@]}") | $(median "${RA[@]}") | $(median "${RC[@]}") | | |"
  echo "(b) >= 0.9 (a) in $(printf "%s\n" "${RA[@]}" | awk '$1 >= 0.9' | wc -l) of $ROUNDS rounds; (b) >= (c) in $(printf "%s\n" "${RC[@]}" | awk '$1 >= 1' | wc -l) of $ROUNDS"
fi
