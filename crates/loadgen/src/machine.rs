//! The machine a run was measured on, as the HTML report names it: host,
//! CPU model and count, memory, operating system and kernel. Read from
//! Linux's `/proc` and `/etc/os-release`; what cannot be read is "unknown".

/// What a figure was measured on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// The host name.
    pub hostname: String,
    /// The CPU model.
    pub cpu: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// Memory, KiB.
    pub memory_kib: Option<u64>,
    /// The operating system (`PRETTY_NAME`).
    pub os: String,
    /// The kernel release.
    pub kernel: String,
}

const UNKNOWN: &str = "unknown";

impl Machine {
    /// This machine.
    pub fn here() -> Machine {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let mut m = Machine::from_files(
            &read("/proc/sys/kernel/hostname"),
            &read("/proc/cpuinfo"),
            &read("/proc/meminfo"),
            &read("/etc/os-release"),
            &read("/proc/sys/kernel/osrelease"),
        );
        if m.cpus == 0 {
            m.cpus = std::thread::available_parallelism().map_or(0, usize::from);
        }
        m
    }

    /// The machine the files' contents describe.
    pub fn from_files(
        hostname: &str,
        cpuinfo: &str,
        meminfo: &str,
        os_release: &str,
        kernel: &str,
    ) -> Machine {
        let known = |s: &str| {
            let s = s.trim();
            if s.is_empty() { UNKNOWN } else { s }.to_string()
        };
        // `key : value` lines (cpuinfo, meminfo) and `KEY=value` (os-release).
        let value = |text: &'_ str, key: &str, sep: char| -> Option<String> {
            text.lines().find_map(|line| {
                let (k, v) = line.split_once(sep)?;
                (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
            })
        };
        let cpus = cpuinfo
            .lines()
            .filter(|l| {
                l.split_once(':')
                    .is_some_and(|(k, _)| k.trim() == "processor")
            })
            .count();
        // x86 names the model; some ARM kernels name only the hardware.
        let cpu = value(cpuinfo, "model name", ':')
            .or_else(|| value(cpuinfo, "Hardware", ':'))
            .unwrap_or_default();
        let memory_kib = value(meminfo, "MemTotal", ':')
            .and_then(|v| v.trim_end_matches("kB").trim().parse().ok());
        let os = value(os_release, "PRETTY_NAME", '=').unwrap_or_default();
        Machine {
            hostname: known(hostname),
            cpu: known(&cpu),
            cpus,
            memory_kib,
            os: known(&os),
            kernel: known(kernel),
        }
    }

    /// Memory as people say it: `23.4 GiB`.
    pub fn memory(&self) -> String {
        self.memory_kib.map_or(UNKNOWN.to_string(), |kib| {
            format!("{:.1} GiB", kib as f64 / (1024.0 * 1024.0))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_is_read_from_proc_and_os_release() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n";
        let meminfo = "MemTotal:       24576000 kB\nMemFree:         1000 kB\n";
        let os = "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\n";
        let m = Machine::from_files("box-1\n", cpuinfo, meminfo, os, "6.1.0-18-amd64\n");
        assert_eq!(
            m,
            Machine {
                hostname: "box-1".into(),
                cpu: "Intel(R) Xeon(R) CPU @ 2.20GHz".into(),
                cpus: 2,
                memory_kib: Some(24_576_000),
                os: "Debian GNU/Linux 12 (bookworm)".into(),
                kernel: "6.1.0-18-amd64".into(),
            }
        );
        assert_eq!(m.memory(), "23.4 GiB");
        let none = Machine::from_files("", "", "", "", "");
        assert_eq!((none.hostname.as_str(), none.cpus), ("unknown", 0));
        assert_eq!(none.memory(), "unknown");
    }
}
