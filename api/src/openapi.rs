//! The frame of the OpenAPI document: title, security schemes, tags, and the operations routes
//! that are not handlers of ours (`/docs`). The paths come from the handlers' `#[utoipa::path]`.

use utoipa::openapi::path::{HttpMethod, OperationBuilder, PathItem};
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as Document, Ref, RefOr, SecurityRequirement};
use utoipa::{Modify, OpenApi};

use crate::error::Problem;

/// The document's frame.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "fleetlog",
        description = "Event-sourced device fleet platform: registry, live state, commands, telemetry, firmware and rollouts. Errors are RFC 7807 problem+json.",
    ),
    components(schemas(Problem)),
    modifiers(&Frame),
    tags(
        (name = "auth", description = "Login, token refresh and logout"),
        (name = "users", description = "Accounts and roles of the tenant"),
        (name = "devices", description = "Registry, live state, desired properties, commands, history and telemetry"),
        (name = "device ingest", description = "Telemetry over HTTP for devices, with the device token"),
        (name = "firmware", description = "Firmware images"),
        (name = "rollouts", description = "Firmware rollouts in waves"),
        (name = "provisioning", description = "Provisioning keys, and devices that provision themselves with one"),
        (name = "live", description = "Server-Sent Event streams"),
        (name = "broker", description = "Device identity for a clustered MQTT broker (EMQX's HTTP authentication and authorization), called by the broker with FLEETLOG_BROKER_AUTH_TOKEN"),
        (name = "operations", description = "Health, readiness, metrics and this document"),
    )
)]
pub struct ApiDoc;

struct Frame;

impl Modify for Frame {
    fn modify(&self, document: &mut Document) {
        let components = document.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("An access token from /api/v1/auth/login"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "device_token",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Device-Token",
                "The device token answered at registration (or as Authorization: Bearer)",
            ))),
        );
        components.add_security_scheme(
            "broker_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The broker's shared secret, FLEETLOG_BROKER_AUTH_TOKEN",
                    ))
                    .build(),
            ),
        );
        // Every operation needs an access token unless it says otherwise.
        document.security = Some(vec![SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
        let page = |summary: &str, content_type: &str, description: &str| {
            PathItem::new(
                HttpMethod::Get,
                OperationBuilder::new()
                    .tag("operations")
                    .summary(Some(summary))
                    .security(SecurityRequirement::default())
                    .response(
                        "200",
                        ResponseBuilder::new()
                            .description(description)
                            .content(content_type, ContentBuilder::new().build()),
                    ),
            )
        };
        document.paths.paths.insert(
            "/openapi.json".into(),
            page(
                "This document",
                "application/json",
                "The OpenAPI 3.1 document of the API",
            ),
        );
        document.paths.paths.insert(
            "/docs/".into(),
            page(
                "Interactive API documentation",
                "text/html",
                "Swagger UI, served from assets built into the binary",
            ),
        );
    }
}

/// Gives every operation the problem responses: each route answers its errors the same way
/// (the fallbacks and layers too), so they are added once here rather than on each handler.
/// Runs on the finished document, after the handlers' paths were collected.
pub fn add_problem_responses(document: &mut Document) {
    for item in document.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            for (status, description) in [
                ("4XX", "A client error, as RFC 7807 problem+json"),
                ("5XX", "A platform error, as RFC 7807 problem+json"),
            ] {
                operation
                    .responses
                    .responses
                    .entry(status.to_string())
                    .or_insert_with(|| problem_response(description));
            }
        }
    }
}

fn problem_response(description: &str) -> RefOr<Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/problem+json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build(),
    )
}
