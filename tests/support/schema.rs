//! A checker for the subset of OpenAPI 3.1 schemas the Wrenn reference uses: `type` (also as a
//! list), `required`, `properties`, `enum`, `items`, `$ref`, `nullable`, `allOf`/`anyOf`/`oneOf`
//! and `format: date-time`. Extra properties are allowed, as in the reference.

use serde_json::Value;

pub struct Spec {
    pub doc: Value,
}

impl Spec {
    pub fn reference() -> Self {
        Self::load(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/reference/wrenn-v1-openapi.yaml"
        ))
    }

    pub fn ours() -> Self {
        Self::load(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml"))
    }

    pub fn load(path: &str) -> Self {
        let text = std::fs::read_to_string(path).unwrap();
        Self {
            doc: serde_yaml::from_str(&text).unwrap(),
        }
    }

    fn resolve<'a>(&'a self, reference: &str) -> &'a Value {
        let pointer = reference.strip_prefix('#').expect("local $ref");
        self.doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("unresolved $ref {reference}"))
    }

    /// Checks `value` against components/schemas/`name`.
    pub fn check_component(&self, name: &str, value: &Value) {
        let schema = self.resolve(&format!("#/components/schemas/{name}"));
        if let Err(e) = self.check(schema, value, "$") {
            panic!("{name} does not match the spec: {e}\nvalue: {value:#}");
        }
    }

    /// Checks a response against the spec's declaration for that operation and status; the
    /// status itself must be declared.
    pub fn check_response(&self, method: &str, path: &str, status: u16, value: &Value) {
        let op = self
            .doc
            .pointer(&format!(
                "/paths/{}/{}",
                path.replace('~', "~0").replace('/', "~1"),
                method.to_lowercase()
            ))
            .unwrap_or_else(|| panic!("{method} {path} is not in the spec"));
        let response = op["responses"].get(status.to_string()).unwrap_or_else(|| {
            panic!("{method} {path}: status {status} is not declared in the spec")
        });
        match response.pointer("/content/application~1json/schema") {
            Some(schema) => {
                if let Err(e) = self.check(schema, value, "$") {
                    panic!(
                        "{method} {path} {status} does not match the spec: {e}\nvalue: {value:#}"
                    );
                }
            }
            None => assert!(
                value.is_null(),
                "{method} {path} {status}: spec declares no body, got {value}"
            ),
        }
    }

    pub fn check(&self, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
        if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
            return self.check(self.resolve(r), value, at);
        }
        if value.is_null() && schema.get("nullable").and_then(Value::as_bool) == Some(true) {
            return Ok(());
        }
        if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
            for s in all {
                self.check(s, value, at)?;
            }
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(options) = schema.get(key).and_then(Value::as_array) {
                if !options.iter().any(|s| self.check(s, value, at).is_ok()) {
                    return Err(format!("{at}: matches none of {key}"));
                }
            }
        }
        if let Some(ty) = schema.get("type") {
            let types: Vec<&str> = match ty {
                Value::String(s) => vec![s.as_str()],
                Value::Array(list) => list.iter().filter_map(Value::as_str).collect(),
                _ => return Err(format!("{at}: bad type in schema")),
            };
            if !types.iter().any(|t| type_matches(t, value)) {
                return Err(format!("{at}: expected {types:?}, got {value}"));
            }
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
            if !allowed.contains(value) {
                return Err(format!("{at}: {value} is not one of {allowed:?}"));
            }
        }
        if schema.get("format").and_then(Value::as_str) == Some("date-time") {
            if let Some(s) = value.as_str() {
                chrono::DateTime::parse_from_rfc3339(s)
                    .map_err(|e| format!("{at}: `{s}` is not date-time: {e}"))?;
            }
        }
        if let (Some(required), Some(obj)) = (
            schema.get("required").and_then(Value::as_array),
            value.as_object(),
        ) {
            for field in required.iter().filter_map(Value::as_str) {
                if !obj.contains_key(field) {
                    return Err(format!("{at}: required property `{field}` is missing"));
                }
            }
        }
        if let (Some(props), Some(obj)) = (
            schema.get("properties").and_then(Value::as_object),
            value.as_object(),
        ) {
            for (name, sub) in props {
                if let Some(v) = obj.get(name) {
                    self.check(sub, v, &format!("{at}.{name}"))?;
                }
            }
        }
        if let (Some(items), Some(list)) = (schema.get("items"), value.as_array()) {
            for (i, v) in list.iter().enumerate() {
                self.check(items, v, &format!("{at}[{i}]"))?;
            }
        }
        Ok(())
    }
}

fn type_matches(ty: &str, value: &Value) -> bool {
    match ty {
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        "null" => value.is_null(),
        _ => false,
    }
}

#[test]
fn checker_rejects_what_it_should() {
    let spec = Spec::reference();
    let host = serde_json::json!({"id": "host-x", "type": "regular", "status": "online", "team_id": null,
        "created_at": "2026-01-01T00:00:00Z"});
    spec.check_component("Host", &host);
    let schema = spec.resolve("#/components/schemas/Host").clone();
    let mut bad = host.clone();
    bad["status"] = "sleeping".into();
    assert!(spec.check(&schema, &bad, "$").is_err());
    bad = host.clone();
    bad["cpu_cores"] = "four".into();
    assert!(spec.check(&schema, &bad, "$").is_err());
    bad = host.clone();
    bad["created_at"] = "yesterday".into();
    assert!(spec.check(&schema, &bad, "$").is_err());
    let req = spec
        .resolve("#/components/schemas/RegisterHostRequest")
        .clone();
    assert!(
        spec.check(&req, &serde_json::json!({"token": "t"}), "$")
            .is_err(),
        "missing required address"
    );
    let team = spec.resolve("#/components/schemas/TeamWithRole").clone();
    assert!(
        spec.check(&team, &serde_json::json!({"id": "t", "role": "boss"}), "$")
            .is_err(),
        "allOf enum"
    );
}
