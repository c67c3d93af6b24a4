//! The fleetlog domain: the Device, Firmware, Rollout, User and ProvisioningKey aggregates, with
//! their commands, events and refusals.
//!
//! Everything here is a pure decision. An aggregate receives a command together with the outside
//! facts it needs (the time, hashes computed by the caller), checks it against its own state, and
//! answers with past-tense events or a refusal. No IO happens here: the write side (`commands`)
//! loads and stores aggregates, the edges (`api`, `ingest`) translate requests into commands.
//!
//! Aggregates decide in a synchronous `decide` step before any event is written, so a refused
//! command never leaves a half-changed aggregate behind.

pub mod device;
pub mod firmware;
pub mod ids;
pub mod limits;
pub mod provisioning;
pub mod rollout;
pub mod upcast;
pub mod user;

pub use ids::{
    CommandId, DeviceId, IdError, ProvisioningKeyId, RolloutId, SessionId, TenantId, UserId,
};

/// The version stamped on every event this crate defines today. A change to an event's shape
/// that old payloads cannot be read as gets a new version and an upcaster ([`upcast`]).
pub const EVENT_VERSION: &str = "1.0";

/// Which of two kinds of traffic an event belongs to, so that consumers can take only the kind
/// they need (the event stream puts it in each subject).
///
/// - `Data`: what devices report about themselves, at the fleet's full rate: telemetry, status
///   and heartbeats. Read models that show the latest readings consume these.
/// - `Control`: everything the platform decides or manages, at human or rollout rate:
///   registration, metadata, commands, desired properties, firmware updates, connectivity, and
///   every event of the other aggregates. Dispatch to devices and the rollout manager need only
///   these, and would otherwise wade through the data plane to find them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Plane {
    /// Device reports: telemetry, status, heartbeats.
    Data,
    /// Everything else.
    Control,
}

impl Plane {
    /// The plane of an event, from its aggregate type and event type as stored.
    pub fn of(aggregate_type: &str, event_type: &str) -> Self {
        if aggregate_type == <device::Device as cqrs_es::Aggregate>::TYPE
            && device::DeviceEvent::DATA_PLANE.contains(&event_type)
        {
            Self::Data
        } else {
            Self::Control
        }
    }

    /// `data` or `control`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Data => "data",
            Self::Control => "control",
        }
    }
}

/// Implements `cqrs_es::Aggregate` for a type that has `decide(&self, command)` and
/// `evolve(&mut self, event)`: `handle` decides first and only then writes the events through
/// the sink (which applies each once), so a refusal leaves the aggregate untouched.
macro_rules! aggregate {
    ($aggregate:ty, $type_name:literal, $command:ty, $event:ty, $error:ty) => {
        impl cqrs_es::Aggregate for $aggregate {
            const TYPE: &'static str = $type_name;
            type Command = $command;
            type Event = $event;
            type Error = $error;
            type Services = ();

            async fn handle(
                &mut self,
                command: Self::Command,
                _services: &Self::Services,
                sink: &cqrs_es::event_sink::EventSink<Self>,
            ) -> Result<(), Self::Error> {
                let events = self.decide(command)?;
                for event in events {
                    sink.write(event, self).await;
                }
                Ok(())
            }

            fn apply(&mut self, event: Self::Event) {
                self.evolve(event);
            }
        }
    };
}
pub(crate) use aggregate;

/// An aggregate that belongs to one tenant once it exists. The write side stamps that tenant on
/// every event's metadata, so consumers of the event stream (live streams, audits) can scope
/// events by tenant without loading the aggregate.
pub trait TenantScoped {
    /// The tenant, once the aggregate exists.
    fn tenant(&self) -> Option<&TenantId>;
}

impl TenantScoped for device::Device {
    fn tenant(&self) -> Option<&TenantId> {
        self.tenant.as_ref()
    }
}

impl TenantScoped for firmware::Firmware {
    fn tenant(&self) -> Option<&TenantId> {
        self.tenant.as_ref()
    }
}

impl TenantScoped for rollout::Rollout {
    fn tenant(&self) -> Option<&TenantId> {
        self.tenant.as_ref()
    }
}

impl TenantScoped for user::User {
    fn tenant(&self) -> Option<&TenantId> {
        self.tenant.as_ref()
    }
}

/// Checks a free-text reason: 1 to 512 characters, not only blanks.
fn is_valid_reason(text: &str) -> bool {
    !text.trim().is_empty() && text.chars().count() <= 512
}
