//! The items of a rendered template and what each one contributes.
//!
//! Only `etcd_reader` items are evaluated in the sandbox: they read another resource's
//! `/state`. Device probes need network access to routers and switches, so the plugin only
//! registers them as monitoring targets for external collectors and reports the status the
//! probe is expected to see; `kafka_messenger` items are targets without a status.

use serde_json::{Map, Value};

use super::{host_error, scalar_text, Job, JobError, LogLevel, Logger, RecordKind, RecordReader};
use super::{HostError, RecordRef, RunContext, Versioned};

/// Item types that collectors probe on devices.
const PROBE_TYPES: [&str; 9] = [
    "router",
    "switch",
    "physical_port",
    "logical_port",
    "vrrp_session",
    "bgp_session",
    "virtual_network",
    "virtual_machine_interface",
    "nova_vm",
];

/// Item props that steer the plugin rather than describe what collectors should probe.
const CONTROL_PROPS: [&str; 5] = [
    "type",
    "timeout",
    "time_between_retries",
    "kafka_topic",
    "wanted_status",
];

/// The top-level key that holds resource mappings instead of an item.
const DB_MAPPINGS: &str = "db_mappings";

const ACTIVE: &str = "ACTIVE";
const DOWN: &str = "DOWN";

/// Where in the template something is, for error messages.
struct Location<'a> {
    template_id: &'a str,
    item: &'a str,
}

impl Location<'_> {
    fn error(&self, message: impl std::fmt::Display) -> JobError {
        JobError::Permanent(format!(
            "heat template {}: item {}: {message}",
            self.template_id, self.item
        ))
    }
}

/// One item of the template.
enum Item {
    EtcdReader(EtcdReader),
    /// A device probe: the status collectors should find, and the target entry they read.
    Probe {
        status: String,
        target: Value,
    },
    /// A monitoring target that reports no status.
    Messenger {
        target: Value,
    },
}

/// An item that waits for another resource's state (`etcd_type`, `etcd_id`).
struct EtcdReader {
    etcd_type: String,
    etcd_id: String,
    retry_ms: f64,
    timeout_ms: f64,
}

/// Everything a rendered template asks for, in template order.
pub(crate) struct Plan {
    items: Vec<(String, Item)>,
    db_mappings: Vec<Value>,
}

/// The result of looking at every item once.
pub(crate) enum Observed {
    /// Every status is known: `{<item>: <status>}` in template order.
    Done(Map<String, Value>),
    /// Some state is not there yet; look again after this many milliseconds.
    Wait(u32),
}

impl Plan {
    /// Classifies the top-level keys of a rendered template.
    pub(crate) fn from_document(
        template_id: &str,
        document: Map<String, Value>,
        job: &Job,
    ) -> Result<Plan, JobError> {
        let mut plan = Plan {
            items: Vec::new(),
            db_mappings: Vec::new(),
        };
        for (name, value) in document {
            if name == DB_MAPPINGS {
                plan.db_mappings = db_mappings(template_id, value)?;
                continue;
            }
            let location = Location {
                template_id,
                item: &name,
            };
            let item = Item::parse(&location, value, job)?;
            plan.items.push((name, item));
        }
        Ok(plan)
    }

    /// Finds every item's status, or how long to wait for a state that is not there yet.
    pub(crate) fn observe(
        &self,
        context: &RunContext,
        reader: &mut dyn RecordReader,
        logger: &mut dyn Logger,
    ) -> Result<Observed, JobError> {
        // Every watched state in one round trip.
        let targets: Vec<RecordRef> = self
            .items
            .iter()
            .filter_map(|(_, item)| match item {
                Item::EtcdReader(etcd) => Some(RecordRef {
                    kind: RecordKind::State,
                    resource_type: etcd.etcd_type.clone(),
                    resource_id: etcd.etcd_id.clone(),
                }),
                _ => None,
            })
            .collect();
        let mut answers = reader.read_many(&targets).into_iter();
        let mut tally = Tally::default();
        for (name, item) in &self.items {
            match item {
                Item::EtcdReader(etcd) => {
                    let answer = answers.next().unwrap_or_else(|| {
                        Err(HostError::Unavailable(
                            "the host gave fewer answers than reads".into(),
                        ))
                    });
                    etcd.observe(name, answer, context, logger, &mut tally)?
                }
                Item::Probe { status, .. } => tally.status(name, status),
                Item::Messenger { .. } => {}
            }
        }
        Ok(tally.finish(logger))
    }

    /// The monitoring-target record: every probe and messenger entry, or `None` if there are
    /// none.
    pub(crate) fn targets_record(&self) -> Option<Value> {
        let targets: Map<String, Value> = self
            .items
            .iter()
            .filter_map(|(name, item)| match item {
                Item::Probe { target, .. } | Item::Messenger { target } => {
                    Some((name.clone(), target.clone()))
                }
                Item::EtcdReader(_) => None,
            })
            .collect();
        (!targets.is_empty()).then_some(Value::Object(targets))
    }

    /// The resource-mapping record, or `None` if the template has no `db_mappings`.
    pub(crate) fn mappings_record(&self, job: &Job) -> Option<Value> {
        if self.db_mappings.is_empty() {
            return None;
        }
        let mut record = Map::new();
        record.insert(
            DB_MAPPINGS.to_owned(),
            Value::Array(self.db_mappings.clone()),
        );
        record.insert("version".to_owned(), Value::from(job.version));
        Some(Value::Object(record))
    }
}

impl Item {
    fn parse(location: &Location<'_>, value: Value, job: &Job) -> Result<Item, JobError> {
        let Value::Object(props) = value else {
            return Err(location.error("is not a mapping of properties"));
        };
        let kind = match props.get("type") {
            Some(Value::String(kind)) => kind.clone(),
            Some(other) => return Err(location.error(format!("type {other} is not a string"))),
            None => return Err(location.error("has no type")),
        };
        match kind.as_str() {
            "etcd_reader" => EtcdReader::parse(location, &props).map(Item::EtcdReader),
            "kafka_messenger" => Ok(Item::Messenger {
                target: target_entry(&kind, props, job),
            }),
            probe if PROBE_TYPES.contains(&probe) => Ok(Item::Probe {
                status: probe_status(location, probe, &props)?,
                target: target_entry(&kind, props, job),
            }),
            unknown => Err(location.error(format!(
                "unknown type {unknown:?} (expected etcd_reader, kafka_messenger or one of {})",
                PROBE_TYPES.join(", ")
            ))),
        }
    }
}

/// The status a probe should find: `wanted_status` if the template gives one.
fn probe_status(
    location: &Location<'_>,
    kind: &str,
    props: &Map<String, Value>,
) -> Result<String, JobError> {
    match props.get("wanted_status") {
        None | Some(Value::Null) if kind == "bgp_session" => Ok("ESTABLISHED".to_owned()),
        None | Some(Value::Null) => Ok(ACTIVE.to_owned()),
        Some(wanted) => scalar_text(wanted)
            .ok_or_else(|| location.error(format!("wanted_status {wanted} is not a scalar"))),
    }
}

/// The entry collectors read for one probe or messenger item.
fn target_entry(kind: &str, props: Map<String, Value>, job: &Job) -> Value {
    let kafka_topic = props.get("kafka_topic").cloned();
    let properties: Map<String, Value> = props
        .into_iter()
        .filter(|(key, _)| !CONTROL_PROPS.contains(&key.as_str()))
        .collect();
    let tenant_id = job.resource_input.get("tenant_id").cloned();
    let mut entry = Map::new();
    entry.insert("type".to_owned(), Value::from(kind));
    entry.insert("properties".to_owned(), Value::Object(properties));
    entry.insert("tenant_id".to_owned(), tenant_id.unwrap_or(Value::Null));
    entry.insert("version".to_owned(), Value::from(job.version));
    entry.insert("action".to_owned(), Value::from(job.action.as_str()));
    if let Some(kafka_topic) = kafka_topic {
        entry.insert("kafka_topic".to_owned(), kafka_topic);
    }
    Value::Object(entry)
}

/// Validates `db_mappings`: a list of mappings (null, e.g. an empty `{% for %}`, means none).
fn db_mappings(template_id: &str, value: Value) -> Result<Vec<Value>, JobError> {
    let entries = match value {
        Value::Null => return Ok(Vec::new()),
        Value::Array(entries) => entries,
        _ => {
            return Err(JobError::Permanent(format!(
                "heat template {template_id}: {DB_MAPPINGS} is not a list"
            )))
        }
    };
    entries
        .into_iter()
        .enumerate()
        .map(|(index, entry)| db_mapping(template_id, index, entry))
        .collect()
}

/// One `db_mappings` entry. `mapped_id` is an id and stays text even where YAML read
/// `mapped_id: 42` as a number.
fn db_mapping(template_id: &str, index: usize, entry: Value) -> Result<Value, JobError> {
    let Value::Object(mut entry) = entry else {
        return Err(JobError::Permanent(format!(
            "heat template {template_id}: {DB_MAPPINGS}[{index}] is not a mapping"
        )));
    };
    if let Some(mapped_id) = entry.get_mut("mapped_id") {
        if let Some(text) = scalar_text(mapped_id) {
            *mapped_id = Value::String(text);
        }
    }
    Ok(Value::Object(entry))
}

impl EtcdReader {
    fn parse(location: &Location<'_>, props: &Map<String, Value>) -> Result<Self, JobError> {
        Ok(EtcdReader {
            etcd_type: required_text(location, props, "etcd_type")?,
            etcd_id: required_text(location, props, "etcd_id")?,
            retry_ms: seconds(location, props, "time_between_retries", 10.0)? * 1000.0,
            timeout_ms: seconds(location, props, "timeout", 120.0)? * 1000.0,
        })
    }

    /// Reads the watched state and records the item's status, or that it must wait.
    fn observe(
        &self,
        name: &str,
        answer: Result<Option<Versioned>, HostError>,
        context: &RunContext,
        logger: &mut dyn Logger,
        tally: &mut Tally,
    ) -> Result<(), JobError> {
        let what = format!("state of {}/{}", self.etcd_type, self.etcd_id);
        let record =
            answer.map_err(|error| host_error(error, &format!("{what} for item {name}")))?;
        let elapsed_ms = context.elapsed_ms as f64;
        match record {
            Some(record) => tally.status(name, state_status(name, &what, &record, logger)),
            None if elapsed_ms < self.timeout_ms => {
                let delay = self.retry_ms.min(self.timeout_ms - elapsed_ms);
                tally.wait(delay, format!("{name} ({what})"));
            }
            None => {
                let message = format!(
                    "item {name}: no {what} after {} s; reporting {DOWN}",
                    self.timeout_ms / 1000.0
                );
                logger.log(LogLevel::Warn, &message);
                tally.status(name, DOWN);
            }
        }
        Ok(())
    }
}

/// ACTIVE when the state record says every monitored part is ACTIVE; logs why not otherwise.
fn state_status(
    name: &str,
    what: &str,
    record: &Versioned,
    logger: &mut dyn Logger,
) -> &'static str {
    match check_state(&record.value) {
        Ok(()) => ACTIVE,
        Err(reason) => {
            logger.log(
                LogLevel::Info,
                &format!("item {name}: {DOWN}: {what}: {reason}"),
            );
            DOWN
        }
    }
}

/// `Ok` when a `/state` record reports no error and its `state.state_monitoring` (a JSON string,
/// or an object) has only ACTIVE values; otherwise the reason it does not.
fn check_state(text: &str) -> Result<(), String> {
    let record: Value =
        serde_json::from_str(text).map_err(|error| format!("record is not valid JSON: {error}"))?;
    match record.get("error") {
        None | Some(Value::Null) => {}
        Some(Value::String(error)) if error.is_empty() => {}
        Some(error) => return Err(format!("it reports error {error}")),
    }
    let monitoring = match record
        .get("state")
        .and_then(|state| state.get("state_monitoring"))
    {
        Some(Value::String(text)) => serde_json::from_str(text)
            .map_err(|error| format!("state_monitoring is not valid JSON: {error}"))?,
        Some(monitoring) => monitoring.clone(),
        None => return Err("it has no state.state_monitoring".to_owned()),
    };
    let Value::Object(monitoring) = monitoring else {
        return Err("state_monitoring is not an object".to_owned());
    };
    match monitoring.iter().find(|(_, status)| *status != ACTIVE) {
        Some((part, status)) => Err(format!("{part} is {status}")),
        None => Ok(()),
    }
}

/// A prop that must be non-empty text (numbers are accepted as text: YAML reads ids like
/// `1234` as numbers).
fn required_text(
    location: &Location<'_>,
    props: &Map<String, Value>,
    key: &str,
) -> Result<String, JobError> {
    match props.get(key).and_then(scalar_text) {
        Some(text) if !text.is_empty() => Ok(text),
        _ => Err(location.error(format!(
            "{key} is missing or empty (did a template variable render empty?)"
        ))),
    }
}

/// A duration prop in seconds (fractions allowed), `default` when absent or null.
fn seconds(
    location: &Location<'_>,
    props: &Map<String, Value>,
    key: &str,
    default: f64,
) -> Result<f64, JobError> {
    let seconds = match props.get(key) {
        None | Some(Value::Null) => return Ok(default),
        Some(Value::Number(number)) => number.as_f64(),
        Some(Value::String(text)) => text.trim().parse::<f64>().ok(),
        Some(_) => None,
    };
    match seconds {
        Some(seconds) if seconds.is_finite() && seconds >= 0.0 => Ok(seconds),
        _ => Err(location.error(format!(
            "{key} must be a non-negative number of seconds, got {}",
            props.get(key).unwrap_or(&Value::Null)
        ))),
    }
}

/// Statuses found so far, and the shortest wait any item asked for.
#[derive(Default)]
struct Tally {
    statuses: Map<String, Value>,
    wait_ms: Option<f64>,
    waiting_for: Vec<String>,
}

impl Tally {
    fn status(&mut self, name: &str, status: &str) {
        self.statuses
            .insert(name.to_owned(), Value::String(status.to_owned()));
    }

    fn wait(&mut self, delay_ms: f64, what: String) {
        self.wait_ms = Some(
            self.wait_ms
                .map_or(delay_ms, |wait_ms| wait_ms.min(delay_ms)),
        );
        self.waiting_for.push(what);
    }

    fn finish(self, logger: &mut dyn Logger) -> Observed {
        let Some(wait_ms) = self.wait_ms else {
            return Observed::Done(self.statuses);
        };
        // Round up so the re-run does not land just before a time-out and wait once more;
        // at least 1 ms, since a zero wait would spin.
        let millis = wait_ms.ceil().clamp(1.0, f64::from(u32::MAX)) as u32;
        let message = format!("waiting {millis} ms for {}", self.waiting_for.join(", "));
        logger.log(LogLevel::Info, &message);
        Observed::Wait(millis)
    }
}
