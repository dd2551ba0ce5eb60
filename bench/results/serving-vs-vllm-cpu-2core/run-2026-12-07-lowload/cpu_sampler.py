"""Which core each running (state R) thread of the serving processes is on, sampled every
10 ms; per-second counts written as `unix_ts comm cpu n` lines (flushed each second)."""
import collections, os, sys, time
out = open(sys.argv[2], "w")
pids, refreshed = [], 0.0
me = str(os.getpid())
counts = collections.Counter(); second = int(time.time())
while True:
    now = time.time()
    if int(now) != second:
        for (comm, cpu), n in counts.items():
            out.write(f"{second} {comm} cpu{cpu} {n}\n")
        out.flush(); counts.clear(); second = int(now)
    if now - refreshed > 1.0:
        pids = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or pid == me: continue
            try:
                comm = open(f"/proc/{pid}/comm").read().strip().replace(" ", "_")
            except OSError: continue
            pids.append((pid, comm[:24]))
        refreshed = now
    for pid, comm in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                st = open(f"/proc/{pid}/task/{tid}/stat").read()
                rest = st[st.rindex(")") + 2:].split()
                if rest[0] == "R":
                    counts[(comm, int(rest[36]))] += 1
        except OSError: continue
    time.sleep(0.01)
