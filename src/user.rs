//! `fleetlog user create`: the first users of a tenant, from the command line.

use std::io::Read;

use anyhow::{bail, Context};
use fleetlog_commands::credentials::hash_password;
use fleetlog_commands::{CommandBus, CommandError, CommandMetadata};
use fleetlog_domain::user::{validate_username, Role, UserCommand};
use fleetlog_domain::{TenantId, UserId};
use secrecy::SecretString;

/// A user to register, checked and with its password hashed before anything connects.
pub struct NewUser {
    tenant: TenantId,
    username: String,
    command: UserCommand,
}

impl NewUser {
    /// `username` in `tenant` with `roles`, its password read from standard input.
    pub fn from_stdin(
        tenant: TenantId,
        username: String,
        roles: Vec<Role>,
    ) -> anyhow::Result<Self> {
        validate_username(&username).context("invalid --username")?;
        let password = read_password_from_stdin()?;
        let password_hash = hash_password(&password).context("password refused")?;
        let command = UserCommand::Register {
            tenant: tenant.clone(),
            username: username.clone(),
            password_hash,
            roles,
            at: chrono::Utc::now(),
        };
        Ok(Self {
            tenant,
            username,
            command,
        })
    }
}

/// Registers the user through `bus`.
pub async fn create(bus: &CommandBus, user: NewUser) -> anyhow::Result<()> {
    let NewUser {
        tenant,
        username,
        command,
    } = user;
    let user_id = UserId::for_username(&tenant, &username);
    let metadata = CommandMetadata::new("cli").with_tenant(tenant.clone());
    match bus
        .users()
        .execute(user_id.as_str(), command, &metadata)
        .await
    {
        Ok(_) => {
            println!("created user {username} ({user_id}) in tenant {tenant}");
            Ok(())
        }
        Err(CommandError::Refused(refusal)) => bail!("cannot create user {username}: {refusal}"),
        Err(error) => Err(error).context("cannot create user"),
    }
}

/// The password: standard input up to 4 KiB, without its line ending.
fn read_password_from_stdin() -> anyhow::Result<SecretString> {
    let mut input = String::new();
    std::io::stdin()
        .take(4096)
        .read_to_string(&mut input)
        .context("cannot read the password from standard input")?;
    let password = input.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        bail!("no password on standard input");
    }
    Ok(SecretString::from(password))
}
