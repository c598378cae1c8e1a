//! `docs/openapi.yaml` (served at `/openapi.yaml`) documents exactly the routes the control plane
//! serves, and agrees with the Wrenn v1 reference for every path both contain.

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
            contract(&our_item[&method]),
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
