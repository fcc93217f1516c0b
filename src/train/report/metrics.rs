//! The metrics log: `metrics.jsonl` in the output folder, one [`StepRecord`] per line, safe
//! against a run killed at any point.

use super::StepRecord;
use crate::error::{Error, Result};
use crate::tensors_io::write_atomic;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// File name of the metrics log inside the output folder.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Metrics log: JSON lines, one [`StepRecord`] per line, at `dir/metrics.jsonl`.
///
/// Crash safety: [`MetricsLog::push`] appends each line with a single plain write (cheap, one
/// syscall per step, and the record is on disk as soon as the step is), and
/// [`MetricsLog::flush`] makes it durable (fsync; call it with each checkpoint). A kill in the
/// middle of a write can leave a torn last line; [`MetricsLog::open`] drops it and rewrites the
/// file atomically, so the file on disk is always whole after `open`. Only a last line may be
/// torn: an unreadable line before it is reported as an error (the file was edited or damaged),
/// not silently discarded.
pub struct MetricsLog {
    path: PathBuf,
    records: Vec<StepRecord>,
    file: File,
    /// A write failed: the file may be short or torn, so the next push or flush rewrites it
    /// (atomically) from the records in memory instead of appending.
    needs_rewrite: bool,
}

impl MetricsLog {
    /// Opens the log; on resume (`resume_from = Some(step)`) keeps only records with
    /// `step < that step` (a killed run may have logged steps after its last checkpoint; they
    /// will be run and logged again) and appends after them. `None` is a fresh run: an existing
    /// log in `dir` is replaced, since mixing two runs' steps in one file would make its curve
    /// meaningless. Creates `dir` if needed.
    pub fn open(dir: &Path, resume_from: Option<usize>) -> Result<MetricsLog> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(METRICS_FILE);
        let records = match resume_from {
            None => Vec::new(),
            Some(from) => {
                let bytes = match std::fs::read(&path) {
                    Ok(b) => b,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                    Err(e) => return Err(Error::io(&path, e)),
                };
                let mut recs = parse_log(&path, &bytes)?;
                recs.retain(|r| r.step < from);
                recs
            }
        };
        write_atomic(&path, &serialize_log(&records)?)?;
        let file = open_append(&path)?;
        Ok(MetricsLog {
            path,
            records,
            file,
            needs_rewrite: false,
        })
    }

    /// All records of the run so far (on resume including those kept from before).
    pub fn records(&self) -> &[StepRecord] {
        &self.records
    }

    /// Where the log is written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record: kept in memory and written through to the file (one append; see the
    /// type's docs for what a crash can leave behind).
    pub fn push(&mut self, rec: StepRecord) -> Result<()> {
        let mut line = record_line(&rec)?;
        line.push(b'\n');
        self.records.push(rec);
        if self.needs_rewrite {
            return self.rewrite();
        }
        if let Err(e) = self.file.write_all(&line) {
            self.needs_rewrite = true;
            return Err(Error::io(&self.path, e));
        }
        Ok(())
    }

    /// Makes every pushed record durable (fsync), or rewrites the file atomically from memory
    /// if an earlier write failed.
    pub fn flush(&mut self) -> Result<()> {
        if self.needs_rewrite {
            return self.rewrite();
        }
        self.file.sync_data().map_err(|e| Error::io(&self.path, e))
    }

    fn rewrite(&mut self) -> Result<()> {
        write_atomic(&self.path, &serialize_log(&self.records)?)?;
        self.file = open_append(&self.path)?;
        self.needs_rewrite = false;
        Ok(())
    }
}

fn open_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

fn record_line(rec: &StepRecord) -> Result<Vec<u8>> {
    serde_json::to_vec(rec)
        .map_err(|e| Error::input(format!("cannot serialize metrics record: {e}")))
}

fn serialize_log(records: &[StepRecord]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(records.len() * 96);
    for r in records {
        out.extend_from_slice(&record_line(r)?);
        out.push(b'\n');
    }
    Ok(out)
}

/// Reads the metrics log of a run folder (`dir/metrics.jsonl`) without changing it; an empty
/// list when there is none.
pub fn read_log(dir: &Path) -> Result<Vec<StepRecord>> {
    let path = dir.join(METRICS_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => parse_log(&path, &bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// Parses a metrics log. A last line without its newline was being written when the run died:
/// it is kept if it parses (only the newline was lost) and dropped otherwise.
fn parse_log(path: &Path, bytes: &[u8]) -> Result<Vec<StepRecord>> {
    let blank = |l: &[u8]| l.iter().all(u8::is_ascii_whitespace);
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let (body, tail) = bytes.split_at(complete);
    let mut out = Vec::new();
    for (i, line) in body.split(|&b| b == b'\n').enumerate() {
        if blank(line) {
            continue;
        }
        let rec = serde_json::from_slice(line).map_err(|e| {
            Error::input(format!(
                "{}:{}: not a metrics record ({e}); fix or delete the file",
                path.display(),
                i + 1
            ))
        })?;
        out.push(rec);
    }
    if !blank(tail) {
        if let Ok(rec) = serde_json::from_slice(tail) {
            out.push(rec);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{rec, synthetic, TempDir};
    use super::*;

    #[test]
    fn log_writes_reopens_and_truncates_on_resume() {
        let dir = TempDir::new("resume");
        let mut log = MetricsLog::open(&dir.0, None).unwrap();
        for r in synthetic(10) {
            log.push(r).unwrap();
        }
        log.flush().unwrap();
        assert_eq!(log.records().len(), 10);
        let text = std::fs::read_to_string(dir.0.join(METRICS_FILE)).unwrap();
        assert_eq!(text.lines().count(), 10);
        assert!(text.ends_with('\n'));
        drop(log);

        // Everything survives a resume past the end.
        let log = MetricsLog::open(&dir.0, Some(100)).unwrap();
        assert_eq!(log.records(), &synthetic(10)[..]);
        drop(log);

        // Resuming from the checkpoint at 6 steps drops the steps logged after it, in memory
        // and on disk, and appends after the rest.
        let mut log = MetricsLog::open(&dir.0, Some(6)).unwrap();
        assert_eq!(log.records(), &synthetic(6)[..]);
        assert_eq!(
            std::fs::read_to_string(log.path()).unwrap().lines().count(),
            6
        );
        log.push(rec(6, 9.0)).unwrap();
        log.flush().unwrap();
        drop(log);
        let log = MetricsLog::open(&dir.0, Some(1000)).unwrap();
        assert_eq!(log.records().len(), 7);
        assert_eq!(log.records()[6], rec(6, 9.0));
        drop(log);

        // A fresh run replaces the old log.
        let log = MetricsLog::open(&dir.0, None).unwrap();
        assert!(log.records().is_empty());
        assert_eq!(std::fs::read(log.path()).unwrap().len(), 0);
        // No temporary files are left behind.
        let names: Vec<String> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![METRICS_FILE.to_string()]);
    }

    #[test]
    fn resume_without_a_log_starts_empty_and_creates_the_folder() {
        let dir = TempDir::new("nolog");
        let sub = dir.0.join("out/run");
        let log = MetricsLog::open(&sub, Some(40)).unwrap();
        assert!(log.records().is_empty());
        assert!(sub.join(METRICS_FILE).is_file());
    }

    #[test]
    fn torn_last_line_is_dropped_and_the_file_repaired() {
        let dir = TempDir::new("torn");
        let path = dir.0.join(METRICS_FILE);
        let mut log = MetricsLog::open(&dir.0, None).unwrap();
        for r in synthetic(5) {
            log.push(r).unwrap();
        }
        drop(log);
        // A run killed in the middle of writing step 5.
        let full = serde_json::to_string(&rec(5, 0.5)).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&full.as_bytes()[..full.len() / 2]).unwrap();
        drop(f);

        let mut log = MetricsLog::open(&dir.0, Some(10)).unwrap();
        assert_eq!(log.records(), &synthetic(5)[..]);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 5);
        assert!(text.ends_with('\n'));
        log.push(rec(5, 0.5)).unwrap();
        drop(log);
        let log = MetricsLog::open(&dir.0, Some(10)).unwrap();
        assert_eq!(log.records().len(), 6);
        drop(log);

        // A whole last record that only lost its newline is kept.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(serde_json::to_string(&rec(6, 0.4)).unwrap().as_bytes())
            .unwrap();
        drop(f);
        let mut log = MetricsLog::open(&dir.0, Some(10)).unwrap();
        assert_eq!(log.records().len(), 7);
        log.push(rec(7, 0.3)).unwrap();
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 8, "{text}");
    }

    #[test]
    fn damaged_line_before_the_end_is_an_error_naming_it() {
        let dir = TempDir::new("damaged");
        let path = dir.0.join(METRICS_FILE);
        let good = serde_json::to_string(&rec(0, 1.0)).unwrap();
        std::fs::write(&path, format!("{good}\n{{garbage\n{good}\n")).unwrap();
        let err = MetricsLog::open(&dir.0, Some(10))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("metrics.jsonl:2:"), "{err}");
        // Blank lines are fine.
        std::fs::write(&path, format!("{good}\n\n{good}\n")).unwrap();
        assert_eq!(
            MetricsLog::open(&dir.0, Some(10)).unwrap().records().len(),
            2
        );
    }
}
