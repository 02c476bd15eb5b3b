# 4 KiB writes with NBD_CMD_FLAG_FUA, one at a time (QD1), timed per request.
#   /usr/bin/python3 bench/fua_qd1.py URI RUNTIME_S RAMP_S SPAN_BYTES
# fio's nbd engine cannot set FUA (its only option is uri=; fsync=N sends a separate FLUSH),
# so this libnbd loop measures the real FUA path; it runs unchanged against every server.
# Prints one JSON line: ops, seconds, iops, mibPerS, latency mean/p50/p99 in microseconds.
import json
import os
import random
import sys
import time

import nbd

BLOCK = 4096


def percentile(sorted_values, fraction):
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, int(round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def main():
    uri, runtime_s, ramp_s, span = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    h = nbd.NBD()
    h.connect_uri(uri)
    if not h.can_fua():
        print(json.dumps({"error": "server does not advertise FUA"}))
        return 1
    blocks = min(span, h.get_size()) // BLOCK
    buf = os.urandom(BLOCK)
    rng = random.Random(1)
    clock = time.perf_counter_ns
    ramp_end = clock() + int(ramp_s * 1e9)
    while clock() < ramp_end:
        h.pwrite(buf, rng.randrange(blocks) * BLOCK, nbd.CMD_FLAG_FUA)
    latencies = []
    start = clock()
    end = start + int(runtime_s * 1e9)
    now = start
    while now < end:
        offset = rng.randrange(blocks) * BLOCK
        before = now
        h.pwrite(buf, offset, nbd.CMD_FLAG_FUA)
        now = clock()
        latencies.append(now - before)
    elapsed_s = (now - start) / 1e9
    h.shutdown()
    latencies.sort()
    ops = len(latencies)
    print(json.dumps({
        "ops": ops,
        "seconds": elapsed_s,
        "iops": ops / elapsed_s,
        "mibPerS": ops * BLOCK / elapsed_s / (1024 * 1024),
        "latencyMeanUs": sum(latencies) / ops / 1000,
        "latencyP50Us": percentile(latencies, 0.50) / 1000,
        "latencyP99Us": percentile(latencies, 0.99) / 1000,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
