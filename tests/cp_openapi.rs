//! `docs/openapi.yaml` (served at `/openapi.yaml`) documents exactly the routes the control plane
//! serves, and agrees with the Wrenn v1 reference for every path both contain. Its only
//! additions to a reference operation are ones an SDK built from the reference never notices:
//! optional query parameters, response headers, and error statuses.

mod support;

use std::collections::BTreeSet;

use serde_json::Value;
use support::schema::Spec;

const METHODS: &[&str] = &["get", "put", "post", "delete", "patch"];

fn documented(spec: &Spec) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in spec.doc["paths"].as_object().unwrap() {
        for method in METHODS {
            if item.get(*method).is_some() {
                out.insert((method.to_string(), path.clone()));
            }
        }
    }
    out
}

/// Drops prose so only the contract is compared.
fn contract(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| {
                    !matches!(
                        k.as_str(),
                        "description" | "summary" | "security" | "example"
                    )
                })
                .map(|(k, v)| (k.clone(), contract(v)))
                .collect(),
        ),
        Value::Array(list) => Value::Array(list.iter().map(contract).collect()),
        other => other.clone(),
    }
}

/// Our operation without its additions to `reference`: query parameters it does not have (each
/// must be optional), response headers it does not name, and error statuses it does not list.
fn without_additions(spec: &Spec, ours: &Value, reference: &Value) -> Value {
    let mut op = ours.clone();
    if let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) {
        let known = reference["parameters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        params.retain(|param| {
            if known.contains(param) {
                return true;
            }
            let resolved = match param["$ref"].as_str() {
                Some(path) => {
                    let name = path.rsplit('/').next().unwrap();
                    spec.doc["components"]["parameters"][name].clone()
                }
                None => param.clone(),
            };
            assert_eq!(resolved["in"], "query", "added parameter {param}");
            assert_ne!(
                resolved["required"], true,
                "added parameter {param} is required"
            );
            false
        });
        if params.is_empty() && reference.get("parameters").is_none() {
            op.as_object_mut().unwrap().remove("parameters");
        }
    }
    if let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) {
        responses.retain(|code, response| {
            let Some(theirs) = reference["responses"].get(code) else {
                assert!(
                    code.starts_with('4') || code.starts_with('5'),
                    "added success status {code}"
                );
                return false;
            };
            if let Some(headers) = response.get_mut("headers").and_then(Value::as_object_mut) {
                headers.retain(|name, _| theirs["headers"].get(name).is_some());
                if headers.is_empty() && theirs.get("headers").is_none() {
                    response.as_object_mut().unwrap().remove("headers");
                }
            }
            true
        });
    }
    op
}

#[test]
fn every_served_route_is_documented_and_nothing_else() {
    let ours = Spec::ours();
    let served: BTreeSet<(String, String)> = wrenn::cp::routes::served()
        .into_iter()
        .map(|r| (r.method.as_str().to_lowercase(), r.path.to_owned()))
        .collect();
    let documented = documented(&ours);
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served but not in docs/openapi.yaml: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "documented but not served: {unserved:?}"
    );
}

#[test]
fn documented_operations_agree_with_the_reference() {
    let ours = Spec::ours();
    let reference = Spec::reference();
    let mut compared = 0;
    for (method, path) in documented(&ours) {
        let Some(ref_item) = reference.doc["paths"].get(&path) else {
            continue;
        };
        let ref_op = ref_item
            .get(&method)
            .unwrap_or_else(|| panic!("{method} {path} is not in the reference"));
        let our_item = &ours.doc["paths"][&path];
        assert_eq!(
            contract(&our_item["parameters"]),
            contract(&ref_item["parameters"]),
            "{path} parameters"
        );
        assert_eq!(
            contract(&without_additions(&ours, &our_item[&method], ref_op)),
            contract(ref_op),
            "{method} {path} differs from the reference"
        );
        compared += 1;
    }
    assert!(compared >= 30, "only {compared} operations compared");
}

#[test]
fn our_schemas_extend_the_reference_without_changing_it() {
    let ours = Spec::ours();
    let reference = Spec::reference();
    for (name, our_schema) in ours.doc["components"]["schemas"].as_object().unwrap() {
        let Some(ref_schema) = reference.doc["components"]["schemas"].get(name) else {
            continue;
        };
        for key in ["type", "required", "allOf", "enum"] {
            assert_eq!(
                contract(&our_schema[key]),
                contract(&ref_schema[key]),
                "{name}.{key}"
            );
        }
        if let Some(props) = ref_schema["properties"].as_object() {
            for (prop, ref_def) in props {
                let our_def = our_schema["properties"]
                    .get(prop)
                    .unwrap_or_else(|| panic!("{name}.{prop} is missing from docs/openapi.yaml"));
                assert_eq!(contract(our_def), contract(ref_def), "{name}.{prop}");
            }
        }
    }
}

#[test]
fn the_served_document_is_the_file() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml")).unwrap();
    assert_eq!(wrenn::cp::routes::OPENAPI_YAML, text);
}
