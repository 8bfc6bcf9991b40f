//! The OpenAPI 3.1 document of the API, built from the route table ([`crate::routes`]) and
//! the model's schemas (utoipa derives them from the types), so it cannot drift from the
//! code; `docs/openapi.json` is its checked-in copy, compared by a test.

use crate::{
    model::*,
    routes::{QueryType, Stream, OPENAPI_PATH, ROUTES},
};

#[derive(utoipa::OpenApi)]
#[openapi(components(schemas(
    CreateCloud,
    Cloud,
    CreatedCloud,
    CloudToken,
    CloudExpiry,
    Quotas,
    Usage,
    CreateVm,
    Vm,
    Power,
    StopReason,
    VmStatus,
    VmState,
    Console,
    CreateVolume,
    Volume,
    VolumeFormat,
    AttachVolume,
    PutRecordSet,
    RecordSet,
    RecordType,
    CreateExposure,
    Exposure,
    Backend,
    Protocol,
    CreateGrant,
    Grant,
    GrantState,
    Offer,
    OfferState,
    OfferPolicy,
    EgressPolicy,
    EgressMode,
    EgressRule,
    EgressLimits,
    ByteBudget,
    BudgetPeriod,
    PortRange,
    HostInfo,
    HostToken,
    HostUnderlay,
    SyncDelta,
    CloudRemotes,
    RemoteEndpoint,
    CloudEgress,
    DeniedReport,
    DeniedDestination,
    DenyReason,
    EgressAddress,
    AssignEgressAddress,
    Publish,
    Publication,
    CloudPublications,
    ProviderServices,
    Service,
    ServiceBackend,
    Placement,
    VolumePlacement,
    Zone,
    ZoneRecord,
    VmRef,
    VolumeRef,
    StatusReport,
    VmReport,
    ExecVm,
    ExecEvent,
    GuestAccess,
    UsageBatch,
    UsageIngested,
    CloudUsage,
    FleetUsage,
    CloudCost,
    UsageItem,
    Budget,
    BudgetStatus,
    BudgetState,
    BudgetEvent,
    crate::usage::UsageEvent,
    crate::usage::UsageData,
    crate::usage::Counters,
    crate::usage::Traffic,
    crate::usage::Resource,
    ErrorBody,
    ErrorDetail,
    CloudId
)))]
struct Schemas;

fn schema_ref(name: &str) -> serde_json::Value {
    match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        Some(inner) => {
            serde_json::json!({"type": "array", "items": {"$ref": format!("#/components/schemas/{inner}")}})
        }
        None => serde_json::json!({"$ref": format!("#/components/schemas/{name}")}),
    }
}

/// A DNS label as `validate_label` accepts it: 1-63 of a-z, 0-9 and '-', not starting or
/// ending with '-'.
const LABEL_PATTERN: &str = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$";

/// What the server accepts for path parameter `name` (the parsers `cloud_param`, `name_param`
/// and `record_type` enforce these), so that clients and fuzzers reading the document build
/// valid paths.
pub fn path_param_schema(name: &str) -> serde_json::Value {
    match name {
        "cloud" | "consumer" | "provider" => serde_json::json!({
            "type": "string",
            "description": "A cloud id: `c` and 8 lowercase hex digits, not all zero.",
            "pattern": "^c[0-9a-f]{8}$",
            "minLength": 9,
            "maxLength": 9,
        }),
        "name" => serde_json::json!({
            "type": "string",
            "description": "A record set's name relative to the cloud's zone: `@` (the apex) or \
                            dot-separated DNS labels; with the zone it fits 253 characters.",
            "pattern": "^(@|[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*)$",
            "minLength": 1,
            "maxLength": 253,
        }),
        "type" => serde_json::json!({
            "type": "string",
            "description": "A record type (case-insensitive).",
            "enum": ["A", "AAAA", "CNAME", "TXT"],
        }),
        _ => serde_json::json!({
            "type": "string",
            "description": "A name: a DNS label.",
            "pattern": LABEL_PATTERN,
            "minLength": 1,
            "maxLength": 63,
        }),
    }
}

/// The OpenAPI 3 document of this API.
pub fn openapi() -> serde_json::Value {
    use utoipa::OpenApi;
    let components =
        serde_json::to_value(Schemas::openapi().components).expect("schemas serialize");
    let mut paths = serde_json::Map::new();
    let error = serde_json::json!({
        "description": "Error",
        "content": {"application/json": {"schema": schema_ref("ErrorBody")}}
    });
    for r in ROUTES {
        let mut op = serde_json::Map::new();
        op.insert("summary".into(), r.summary.into());
        op.insert("operationId".into(), r.operation_id().into());
        let params: Vec<serde_json::Value> = r
            .params()
            .map(|n| serde_json::json!({"name": n, "in": "path", "required": true, "schema": path_param_schema(n)}))
            .chain(r.query.iter().map(|(n, t)| {
                let schema = match t {
                    QueryType::Text => serde_json::json!({"type": "string"}),
                    QueryType::Integer => serde_json::json!({"type": "integer"}),
                    QueryType::Bounded(min, max) => {
                        serde_json::json!({"type": "integer", "minimum": min, "maximum": max})
                    }
                };
                serde_json::json!({"name": n, "in": "query", "schema": schema})
            }))
            .collect();
        if !params.is_empty() {
            op.insert("parameters".into(), params.into());
        }
        let bytes = serde_json::json!({"type": "string", "format": "binary"});
        if let Some(b) = r.body {
            op.insert(
                "requestBody".into(),
                serde_json::json!({"required": true, "content": {"application/json": {"schema": schema_ref(b)}}}),
            );
        } else if r.stream == Some(Stream::BytesBody) {
            op.insert(
                "requestBody".into(),
                serde_json::json!({"required": true, "content": {"application/octet-stream": {"schema": bytes}}}),
            );
        }
        let mut responses = serde_json::Map::new();
        let ok = match (r.response, r.stream) {
            (Some(s), Some(Stream::NdjsonReply)) => {
                serde_json::json!({"description": "OK: one JSON object per line", "content": {"application/x-ndjson": {"schema": schema_ref(s)}}})
            }
            (Some(s), Some(Stream::JsonOrCsv)) => {
                serde_json::json!({"description": "OK: JSON, or with format=focus FOCUS 1.2 CSV", "content": {
                    "application/json": {"schema": schema_ref(s)},
                    "text/csv": {"schema": {"type": "string"}}
                }})
            }
            (_, Some(Stream::BytesReply)) => {
                serde_json::json!({"description": "OK", "content": {"application/octet-stream": {"schema": bytes}}})
            }
            (Some(s), _) => {
                serde_json::json!({"description": "OK", "content": {"application/json": {"schema": schema_ref(s)}}})
            }
            (None, _) => serde_json::json!({"description": "OK"}),
        };
        responses.insert(r.status.to_string(), ok);
        responses.insert("default".into(), error.clone());
        op.insert("security".into(), serde_json::json!([{"bearer": []}]));
        op.insert("responses".into(), responses.into());
        let entry = paths
            .entry(r.path.to_string())
            .or_insert_with(|| serde_json::json!({}));
        entry[r.method.as_str().to_ascii_lowercase()] = op.into();
    }
    // The document itself, served without a token.
    paths.insert(
        OPENAPI_PATH.into(),
        serde_json::json!({"get": {
            "summary": "This document",
            "operationId": "get_openapi_json",
            "responses": {"200": {"description": "OK"}},
        }}),
    );
    let mut components = components;
    components["securitySchemes"] =
        serde_json::json!({"bearer": {"type": "http", "scheme": "bearer"}});
    serde_json::json!({
        "openapi": "3.1.0",
        "info": {
            "title": "atoll control plane",
            "version": "v1",
            "description": "Clouds, VMs, volumes, DNS, exposures and grants. Errors are JSON `ErrorBody`s naming the offending field."
        },
        "paths": paths,
        "components": components,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::{cloud_param, name_param, record_type};
    use std::collections::HashMap;

    /// Every path parameter the document states carries what the server enforces (a pattern
    /// or an enumeration), and sample values that the parsers accept fit its bounds.
    #[test]
    fn path_parameters_state_what_the_server_enforces() {
        let doc = openapi();
        let mut seen = std::collections::BTreeSet::new();
        for (_, item) in doc["paths"].as_object().unwrap() {
            for (_, op) in item.as_object().unwrap() {
                for p in op["parameters"].as_array().into_iter().flatten() {
                    if p["in"] != "path" {
                        continue;
                    }
                    let schema = &p["schema"];
                    assert!(
                        schema.get("pattern").is_some() || schema.get("enum").is_some(),
                        "{p}"
                    );
                    seen.insert(p["name"].as_str().unwrap().to_string());
                }
            }
        }
        assert!(seen.contains("cloud") && seen.contains("vm") && seen.contains("type"));
        let params = |k: &str, v: &str| HashMap::from([(k.to_string(), v.to_string())]);
        let cloud = "c0000002a";
        assert!(cloud_param(&params("cloud", cloud), "cloud").is_ok());
        assert_eq!(
            cloud.len() as u64,
            path_param_schema("cloud")["maxLength"].as_u64().unwrap()
        );
        let label = "a".repeat(63);
        assert!(name_param(&params("vm", &label), "vm").is_ok());
        assert!(name_param(&params("vm", &format!("{label}a")), "vm").is_err());
        assert_eq!(path_param_schema("vm")["maxLength"], 63);
        for t in path_param_schema("type")["enum"].as_array().unwrap() {
            assert!(record_type(&params("type", t.as_str().unwrap())).is_ok());
        }
    }
}
