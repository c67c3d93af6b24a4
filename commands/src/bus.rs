//! The command bus: one entry point to the aggregate stores, shared by every role.

use fleetlog_domain::device::Device;
use fleetlog_domain::firmware::Firmware;
use fleetlog_domain::provisioning::ProvisioningKey;
use fleetlog_domain::rollout::Rollout;
use fleetlog_domain::user::User;
use std::sync::Arc;

use sqlx::PgPool;

use crate::inline::InlineProjection;
use crate::store::{AggregateStore, StoreSettings};

/// The write side as one value: a store per aggregate type over one pool. Cheap to clone (one
/// reference count: the API clones it with its state for every request).
#[derive(Clone)]
pub struct CommandBus {
    stores: Arc<Stores>,
}

struct Stores {
    pool: PgPool,
    devices: AggregateStore<Device>,
    firmware: AggregateStore<Firmware>,
    rollouts: AggregateStore<Rollout>,
    users: AggregateStore<User>,
    provisioning_keys: AggregateStore<ProvisioningKey>,
}

impl CommandBus {
    /// A bus over `pool`, each store tuned by `settings`, keeping `device_models` (the device
    /// read models, `fleetlog_projections::DeviceModels::inline()`) in every transaction that
    /// appends Device events.
    pub fn new(
        pool: PgPool,
        settings: StoreSettings,
        device_models: Arc<dyn InlineProjection<Device>>,
    ) -> Self {
        let stores = Stores {
            devices: AggregateStore::new(pool.clone(), (), settings).with_inline(device_models),
            firmware: AggregateStore::new(pool.clone(), (), settings),
            rollouts: AggregateStore::new(pool.clone(), (), settings),
            users: AggregateStore::new(pool.clone(), (), settings),
            provisioning_keys: AggregateStore::new(pool.clone(), (), settings),
            pool,
        };
        Self {
            stores: Arc::new(stores),
        }
    }

    /// Devices.
    pub fn devices(&self) -> &AggregateStore<Device> {
        &self.stores.devices
    }

    /// Firmware images.
    pub fn firmware(&self) -> &AggregateStore<Firmware> {
        &self.stores.firmware
    }

    /// Rollouts.
    pub fn rollouts(&self) -> &AggregateStore<Rollout> {
        &self.stores.rollouts
    }

    /// Users.
    pub fn users(&self) -> &AggregateStore<User> {
        &self.stores.users
    }

    /// Provisioning keys.
    pub fn provisioning_keys(&self) -> &AggregateStore<ProvisioningKey> {
        &self.stores.provisioning_keys
    }

    /// The pool the stores write to.
    pub fn pool(&self) -> &PgPool {
        &self.stores.pool
    }
}
