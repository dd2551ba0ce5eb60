import sys
def maps(pid):
    out = {}; cur = None
    for line in open(f"/proc/{pid}/smaps"):
        parts = line.split()
        if "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
            name = parts[5] if len(parts) > 5 else "[anon]"
            cur = (parts[0], name)
        elif parts[0] == "Rss:":
            out[cur] = int(parts[1])
    return out
