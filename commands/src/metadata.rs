//! Who asked for a command and why: copied onto every event the command produces.

use std::collections::HashMap;

use fleetlog_domain::TenantId;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The context of a command. Stored as the `metadata` of each event it produced, so every fact
/// can be traced to a person or process (actor), a tenant, and the chain of requests and events
/// that led to it (correlation and causation ids).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandMetadata {
    /// Who issued the command: `user:{id}`, `device:{id}`, `system:{process}`, `cli`.
    pub actor: String,
    /// The tenant the command acts in, when it is known.
    pub tenant: Option<TenantId>,
    /// Shared by every command and event of one business flow.
    pub correlation_id: String,
    /// The message or event that caused this command, if any.
    pub causation_id: Option<String>,
    /// The HTTP request or MQTT message that carried the command, if any.
    pub request_id: Option<String>,
}

impl CommandMetadata {
    /// Metadata for a command that starts a new flow.
    pub fn new(actor: impl Into<String>) -> Self {
        Self {
            actor: actor.into(),
            tenant: None,
            correlation_id: Uuid::now_v7().to_string(),
            causation_id: None,
            request_id: None,
        }
    }

    /// Sets the tenant.
    pub fn with_tenant(mut self, tenant: TenantId) -> Self {
        self.tenant = Some(tenant);
        self
    }

    /// Continues the flow of `correlation_id`.
    pub fn with_correlation_id(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = correlation_id.into();
        self
    }

    /// Names the message or event that caused the command.
    pub fn with_causation_id(mut self, causation_id: impl Into<String>) -> Self {
        self.causation_id = Some(causation_id.into());
        self
    }

    /// Names the request that carried the command.
    pub fn with_request_id(mut self, request_id: impl Into<String>) -> Self {
        self.request_id = Some(request_id.into());
        self
    }

    /// The form cqrs-es carries on each event envelope.
    pub fn to_map(&self) -> HashMap<String, String> {
        let mut map = HashMap::with_capacity(5);
        map.insert("actor".to_string(), self.actor.clone());
        map.insert("correlation_id".to_string(), self.correlation_id.clone());
        if let Some(tenant) = &self.tenant {
            map.insert("tenant".to_string(), tenant.to_string());
        }
        if let Some(causation_id) = &self.causation_id {
            map.insert("causation_id".to_string(), causation_id.clone());
        }
        if let Some(request_id) = &self.request_id {
            map.insert("request_id".to_string(), request_id.clone());
        }
        map
    }
}
