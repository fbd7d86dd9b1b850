"""Search another process's memory for byte strings (root: /proc/PID/maps + mem).

Every readable mapping is read whole (the kernel's own [vvar]/[vsyscall] pages
are skipped: they cannot be read through mem); a needle that straddles two
mappings is not found, which is acceptable for secrets kept in one buffer.
"""
from __future__ import annotations

SKIP = {"[vvar]", "[vsyscall]", "[vvar_vclock]"}


def find_in_memory(pid: int, needles: dict[str, bytes]) -> dict[str, list[str]]:
    """{needle name: [mapping where it occurs, ...]} for the needles found."""
    found: dict[str, list[str]] = {}
    regions_read = 0
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            addr, perms = fields[0], fields[1]
            name = fields[5] if len(fields) > 5 else "[anon]"
            if perms[0] != "r" or name in SKIP:
                continue
            start, end = (int(x, 16) for x in addr.split("-"))
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue
            regions_read += 1
            for key, needle in needles.items():
                if needle in data:
                    found.setdefault(key, []).append(f"{name}@{start:#x}")
    assert regions_read > 0, f"could not read any memory of process {pid}"
    return found

