//! Results of load runs: one [`RunReport`] per run (printed as one JSON
//! object or a small table), and [`compare`], which turns the runs of a
//! side-by-side session into one markdown table of medians and Cell0/etcd
//! ratios.

use serde::{Deserialize, Serialize};

use crate::config::{Consistency, Op, Target};
use crate::procstat::ProcessCpu;

/// The result of one load run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// System loaded.
    pub target: Target,
    /// Operation.
    pub op: Op,
    /// Read consistency (gets only).
    #[serde(default)]
    pub consistency: Option<Consistency>,
    /// Concurrent clients (connections).
    pub clients: usize,
    /// Node URIs; client i used endpoint i mod n.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Requested duration in seconds.
    pub duration_s: f64,
    /// Measured seconds: from the start of the clients until the last one
    /// finished its last request.
    pub seconds: f64,
    /// Value size in bytes.
    pub value_size: usize,
    /// Keys in the key space.
    pub keys: u64,
    /// Seconds spent writing the key space before the run, when asked to.
    #[serde(default)]
    pub prefill_seconds: Option<f64>,
    /// Successful requests.
    pub ops: u64,
    /// Failed requests (not in the latency histogram).
    pub errors: u64,
    /// Gets that found no key.
    #[serde(default)]
    pub not_found: u64,
    /// The first error seen, as `code: message`.
    #[serde(default)]
    pub first_error: Option<String>,
    /// Successful requests per second.
    pub ops_per_second: f64,
    /// Mean latency of successful requests, milliseconds.
    pub mean_ms: f64,
    /// Median latency, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: f64,
    /// 99.9th percentile latency, milliseconds.
    pub p999_ms: f64,
    /// Highest latency, milliseconds.
    pub max_ms: f64,
    /// CPU seconds of every measured server process over the run.
    #[serde(default)]
    pub server_cpu: Vec<ProcessCpu>,
    /// Sum of `server_cpu`; absent without `--pids` or when a process exited.
    #[serde(default)]
    pub server_cpu_seconds: Option<f64>,
    /// Server CPU microseconds per successful request.
    #[serde(default)]
    pub cpu_us_per_op: Option<f64>,
    /// CPU seconds of the load generator itself over the run.
    #[serde(default)]
    pub client_cpu_seconds: Option<f64>,
    /// Clock ticks per second used to convert `/proc` times.
    #[serde(default)]
    pub clock_ticks_per_second: u64,
    /// `/proc/loadavg` (1, 5, 15 minutes) before the run.
    #[serde(default)]
    pub load_average_start: Option<[f64; 3]>,
    /// `/proc/loadavg` after the run.
    #[serde(default)]
    pub load_average_end: Option<[f64; 3]>,
}

impl RunReport {
    /// The operation as shown in tables: `put`, `get (linearizable)`,
    /// `get (serializable)`.
    pub fn op_label(&self) -> String {
        match (self.op, self.consistency) {
            (Op::Get, Some(c)) => format!("get ({})", c.name()),
            (op, _) => op.name().to_string(),
        }
    }

    /// The load generator's own CPU µs per successful operation, when it
    /// was measured and an operation succeeded.
    pub fn client_us_per_op(&self) -> Option<f64> {
        self.client_cpu_seconds
            .filter(|_| self.ops > 0)
            .map(|s| s * 1e6 / self.ops as f64)
    }

    /// This run as one line of JSON.
    pub fn to_json_line(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }

    /// This run as an aligned table with a header row.
    pub fn to_table(&self) -> String {
        let headers = [
            "TARGET",
            "OP",
            "CLIENTS",
            "OPS/S",
            "P50 MS",
            "P99 MS",
            "P999 MS",
            "ERRORS",
            "SERVER CPU S",
            "CPU US/OP",
        ];
        let row = vec![
            self.target.name().to_string(),
            self.op_label(),
            self.clients.to_string(),
            thousands(self.ops_per_second),
            format!("{:.2}", self.p50_ms),
            format!("{:.2}", self.p99_ms),
            format!("{:.2}", self.p999_ms),
            self.errors.to_string(),
            self.server_cpu_seconds
                .map_or_else(|| "n/a".to_string(), |s| format!("{s:.2}")),
            cpu_per_op(self.cpu_us_per_op),
        ];
        aligned(&headers, &[row])
    }
}

/// Parses runs written one JSON object per line (blank lines skipped).
pub fn parse_runs(text: &str) -> Result<Vec<RunReport>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("line {}: {e}", i + 1)))
        .collect()
}

/// The median of `values`; `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// `a / b` with two decimals, or `n/a` when either is missing or `b` is not
/// positive.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => format!("{:.2}", a / b),
        _ => "n/a".to_string(),
    }
}

/// A count rounded to an integer with thousands separators: `12,345`.
pub fn thousands(x: f64) -> String {
    let n = x.round();
    if !n.is_finite() {
        return "n/a".to_string();
    }
    let digits = format!("{:.0}", n.abs());
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0.0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// CPU microseconds per operation: no decimals (with thousands separators)
/// from 100 up, one below.
pub fn cpu_per_op(us: Option<f64>) -> String {
    match us {
        Some(us) if us >= 100.0 => thousands(us),
        Some(us) => format!("{us:.1}"),
        None => "n/a".to_string(),
    }
}

fn latency_pair(p50: Option<f64>, p99: Option<f64>) -> String {
    match (p50, p99) {
        (Some(a), Some(b)) => format!("{a:.2} / {b:.2}"),
        _ => "n/a".to_string(),
    }
}

/// Left-aligned columns separated by two spaces.
fn aligned(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}", w = *w))
            .collect();
        padded.join("  ").trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}

/// Medians of the runs of one target in one row of the comparison.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Medians {
    /// Runs combined.
    pub runs: usize,
    /// Median ops/s.
    pub ops_per_second: Option<f64>,
    /// Median p50 latency, ms.
    pub p50_ms: Option<f64>,
    /// Median p99 latency, ms.
    pub p99_ms: Option<f64>,
    /// Median server CPU µs per operation (runs without CPU figures left
    /// out).
    pub cpu_us_per_op: Option<f64>,
    /// Median CPU µs the load generator itself spent per operation (runs
    /// without the figure, or without a successful operation, left out):
    /// on a machine it shares with the servers, what it takes from them.
    pub client_us_per_op: Option<f64>,
    /// Failed requests, summed over the runs.
    pub errors: u64,
}

impl Medians {
    /// The medians of `runs`.
    pub fn of<'a>(runs: impl IntoIterator<Item = &'a RunReport>) -> Self {
        let runs: Vec<&RunReport> = runs.into_iter().collect();
        let of = |f: &dyn Fn(&RunReport) -> Option<f64>| median(&runs.iter().filter_map(|r| f(r)).collect::<Vec<_>>());
        Medians {
            runs: runs.len(),
            ops_per_second: of(&|r| Some(r.ops_per_second)),
            p50_ms: of(&|r| Some(r.p50_ms)),
            p99_ms: of(&|r| Some(r.p99_ms)),
            cpu_us_per_op: of(&|r| r.cpu_us_per_op),
            client_us_per_op: of(&|r| r.client_us_per_op()),
            errors: runs.iter().map(|r| r.errors).sum(),
        }
    }
}

/// One row of the comparison: an operation and client count, with the
/// medians of each target.
#[derive(Debug, Clone, PartialEq)]
pub struct ComparisonRow {
    /// Operation label ([`RunReport::op_label`]).
    pub op: String,
    /// Concurrent clients.
    pub clients: usize,
    /// etcd's medians.
    pub etcd: Medians,
    /// Cell0's medians.
    pub cell0: Medians,
}

/// Groups runs by operation and client count (in the order they first
/// appear) and takes the medians of each target.
pub fn comparison_rows(runs: &[RunReport]) -> Vec<ComparisonRow> {
    let mut keys: Vec<(String, usize)> = Vec::new();
    for r in runs {
        let key = (r.op_label(), r.clients);
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys.into_iter()
        .map(|(op, clients)| {
            let of = |t: Target| {
                Medians::of(
                    runs.iter()
                        .filter(|r| r.target == t && r.clients == clients && r.op_label() == op),
                )
            };
            ComparisonRow {
                etcd: of(Target::Etcd),
                cell0: of(Target::Cell0),
                op,
                clients,
            }
        })
        .collect()
}

/// The comparison as a markdown table: ops/s, p50/p99 latency, server CPU
/// per operation and the load generator's of each target, medians over the
/// runs, with Cell0/etcd ratios; a note under the table says how many runs
/// each cell combines.
pub fn compare(runs: &[RunReport]) -> String {
    let rows = comparison_rows(runs);
    let mut out = String::from(
        "| op | clients | etcd ops/s | Cell0 ops/s | Cell0/etcd | etcd p50/p99 ms | Cell0 p50/p99 ms \
         | etcd CPU µs/op | Cell0 CPU µs/op | CPU Cell0/etcd | load generator µs/op etcd/Cell0 \
         | errors etcd/Cell0 |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let (mut least, mut most) = (usize::MAX, 0);
    for r in &rows {
        for m in [&r.etcd, &r.cell0] {
            least = least.min(m.runs);
            most = most.max(m.runs);
        }
        let ops = |m: &Medians| m.ops_per_second.map_or_else(|| "n/a".to_string(), thousands);
        out += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {}/{} |\n",
            r.op,
            r.clients,
            ops(&r.etcd),
            ops(&r.cell0),
            ratio(r.cell0.ops_per_second, r.etcd.ops_per_second),
            latency_pair(r.etcd.p50_ms, r.etcd.p99_ms),
            latency_pair(r.cell0.p50_ms, r.cell0.p99_ms),
            cpu_per_op(r.etcd.cpu_us_per_op),
            cpu_per_op(r.cell0.cpu_us_per_op),
            ratio(r.cell0.cpu_us_per_op, r.etcd.cpu_us_per_op),
            cpu_per_op(r.etcd.client_us_per_op),
            cpu_per_op(r.cell0.client_us_per_op),
            r.etcd.errors,
            r.cell0.errors,
        );
    }
    let runs = match (rows.is_empty(), least == most) {
        (true, _) => "no runs".to_string(),
        (false, true) => format!("{most} run(s) per cell"),
        (false, false) => format!("{least} to {most} runs per cell"),
    };
    out += &format!(
        "\nMedians over rounds ({runs}). CPU µs/op: utime + stime of the server processes (/proc) \
         over the run, per successful request; lower is better. Load generator µs/op: its own CPU \
         per successful request, taken from the servers' machine when they share it. Errors: \
         summed over the rounds.\n"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(target: Target, op: Op, clients: usize, ops_s: f64, cpu: Option<f64>) -> RunReport {
        RunReport {
            target,
            op,
            consistency: (op == Op::Get).then_some(Consistency::Linearizable),
            clients,
            endpoints: vec!["http://127.0.0.1:1".into()],
            duration_s: 8.0,
            seconds: 8.01,
            value_size: 256,
            keys: 100_000,
            prefill_seconds: None,
            ops: (ops_s * 8.0) as u64,
            errors: 0,
            not_found: 0,
            first_error: None,
            ops_per_second: ops_s,
            mean_ms: 1.0,
            p50_ms: ops_s / 10_000.0,
            p99_ms: ops_s / 1_000.0,
            p999_ms: 9.0,
            max_ms: 10.0,
            server_cpu: vec![ProcessCpu {
                pid: 1,
                seconds: Some(1.0),
            }],
            server_cpu_seconds: Some(1.0),
            cpu_us_per_op: cpu,
            client_cpu_seconds: Some(0.5),
            clock_ticks_per_second: 100,
            load_average_start: Some([1.0, 2.0, 3.0]),
            load_average_end: None,
        }
    }

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(ratio(Some(3.0), Some(2.0)), "1.50");
        assert_eq!(ratio(Some(1.0), Some(3.0)), "0.33");
        assert_eq!(ratio(Some(1.0), Some(0.0)), "n/a");
        assert_eq!(ratio(None, Some(1.0)), "n/a");
        assert_eq!(ratio(Some(1.0), None), "n/a");
    }

    #[test]
    fn number_formats() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(12_345.6), "12,346");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
        assert_eq!(thousands(-4321.0), "-4,321");
        assert_eq!(thousands(f64::NAN), "n/a");
        assert_eq!(cpu_per_op(Some(123.4)), "123");
        assert_eq!(cpu_per_op(Some(5801.6)), "5,802");
        assert_eq!(cpu_per_op(Some(42.25)), "42.2");
        assert_eq!(cpu_per_op(None), "n/a");
    }

    #[test]
    fn json_round_trip() {
        let r = run(Target::Cell0, Op::Get, 64, 9000.0, Some(150.0));
        let line = r.to_json_line().unwrap();
        assert!(!line.contains('\n'));
        assert!(line.contains(r#""target":"cell0""#));
        assert!(line.contains(r#""consistency":"linearizable""#));
        let back = parse_runs(&format!("\n{line}\n\n{line}\n")).unwrap();
        assert_eq!(back, vec![r.clone(), r]);
        assert!(parse_runs("{\"target\": 1}").unwrap_err().starts_with("line 1:"));
    }

    #[test]
    fn single_run_table() {
        let t = run(Target::Etcd, Op::Put, 1, 1234.0, None).to_table();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("TARGET  OP   CLIENTS  OPS/S"));
        assert!(lines[1].starts_with("etcd    put  1        1,234"), "{t}");
        assert!(lines[1].ends_with("1.00          n/a"), "{t}");
    }

    #[test]
    fn comparison_table() {
        let runs = vec![
            run(Target::Etcd, Op::Put, 64, 10_000.0, Some(200.0)),
            run(Target::Cell0, Op::Put, 64, 5_000.0, Some(300.0)),
            run(Target::Etcd, Op::Get, 64, 20_000.0, Some(50.0)),
            run(Target::Cell0, Op::Get, 64, 30_000.0, None),
            run(Target::Etcd, Op::Put, 64, 12_000.0, Some(100.0)),
            run(Target::Cell0, Op::Put, 64, 7_000.0, Some(500.0)),
        ];
        let rows = comparison_rows(&runs);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].op, "put");
        assert_eq!(rows[0].etcd.runs, 2);
        assert_eq!(rows[0].etcd.ops_per_second, Some(11_000.0));
        assert_eq!(rows[0].cell0.cpu_us_per_op, Some(400.0));
        assert_eq!(rows[1].op, "get (linearizable)");
        assert_eq!(rows[1].cell0.cpu_us_per_op, None);

        let table = compare(&runs);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("| op | clients | etcd ops/s | Cell0 ops/s | Cell0/etcd |"));
        assert_eq!(
            lines[2],
            "| put | 64 | 11,000 | 6,000 | 0.55 | 1.10 / 11.00 | 0.60 / 6.00 | 150 | 400 | 2.67 | 5.7 / 10.7 | 0/0 |"
        );
        assert_eq!(
            lines[3],
            "| get (linearizable) | 64 | 20,000 | 30,000 | 1.50 | 2.00 / 20.00 | 3.00 / 30.00 | 50.0 | n/a | n/a | 3.1 / 2.1 | 0/0 |"
        );
        assert!(table.contains("1 to 2 runs per cell"), "{table}");
    }

    #[test]
    fn comparison_with_one_target_missing() {
        let runs = vec![run(Target::Cell0, Op::Put, 1, 500.0, Some(90.0))];
        let table = compare(&runs);
        assert!(
            table.contains("| put | 1 | n/a | 500 | n/a | n/a | 0.05 / 0.50 | n/a | 90.0 | n/a | n/a / 125 | 0/0 |"),
            "{table}"
        );
        assert!(table.contains("0 to 1 runs per cell"));
        assert!(compare(&[]).contains("no runs"));
    }
}
