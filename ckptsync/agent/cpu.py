"""What the CPU offers: read from /proc/cpuinfo, by the agent and by the laptop alike."""


def cpu_aes(cpuinfo="/proc/cpuinfo"):
    """Whether the CPU has AES instructions: `aes` among the first processor's flags (x86) or
    Features (arm64). None where the file does not say."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    return "aes" in value.split()
    except OSError:
        pass
    return None
