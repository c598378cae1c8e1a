//! A small Swagger 2.0 validator for the Firecracker API contract: finds the operation for a
//! method and concrete path, and checks a JSON body against its schema (`$ref`, `type`,
//! `required`, `properties`, unknown fields, `enum`, `minimum`/`maximum`, `items`). Firecracker
//! rejects unknown fields, so an object without `additionalProperties` admits only the
//! properties it lists.

use std::path::PathBuf;

use serde_json::Value;

/// The vendored spec, relative to the repository root (see tests/reference/README.md).
pub const SPEC_RELATIVE: &str = "tests/reference/firecracker-v1.16.1-swagger.yaml";

pub struct Swagger {
    doc: Value,
}

impl Swagger {
    /// Loads the vendored reference spec.
    pub fn load() -> Self {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(SPEC_RELATIVE);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "the Firecracker swagger {} is missing ({e}); it is vendored in tests/reference/",
                path.display()
            )
        });
        let doc: Value = serde_yaml::from_str(&text).expect("the swagger is valid YAML");
        assert_eq!(
            doc["swagger"],
            "2.0",
            "unexpected spec format in {}",
            path.display()
        );
        Self { doc }
    }

    /// Checks that `method path` is an operation of the API and that `body` is what it takes.
    pub fn validate_call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(), String> {
        let (template, params) = self
            .match_path(path)
            .ok_or_else(|| format!("no path matches {path}"))?;
        let operation = &self.doc["paths"][template.as_str()][method.to_ascii_lowercase()];
        if operation.is_null() {
            return Err(format!("{method} is not an operation of {template}"));
        }
        let parameters = operation["parameters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let body_param = parameters.iter().find(|p| p["in"] == "body");
        match (body_param, body) {
            (None, Some(_)) => return Err(format!("{method} {template} takes no body")),
            (Some(p), None) if p["required"] == true => {
                return Err(format!("{method} {template} needs a body"))
            }
            (Some(p), Some(body)) => self.validate(&p["schema"], body, "body")?,
            _ => {}
        }
        // Firecracker requires ids in the path to equal the ids in the body.
        for (name, value) in params {
            if let Some(in_body) = body.and_then(|b| b.get(&name)) {
                if in_body != &Value::String(value.clone()) {
                    return Err(format!(
                        "path parameter {name}={value} differs from body {in_body}"
                    ));
                }
            }
        }
        Ok(())
    }

    fn match_path(&self, path: &str) -> Option<(String, Vec<(String, String)>)> {
        let segments: Vec<&str> = path.split('/').collect();
        for template in self.doc["paths"].as_object()?.keys() {
            let parts: Vec<&str> = template.split('/').collect();
            if parts.len() != segments.len() {
                continue;
            }
            let mut params = Vec::new();
            let matched = parts.iter().zip(&segments).all(|(part, seg)| {
                match part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                    Some(name) if !seg.is_empty() => {
                        params.push((name.to_owned(), (*seg).to_owned()));
                        true
                    }
                    Some(_) => false,
                    None => part == seg,
                }
            });
            if matched {
                return Some((template.clone(), params));
            }
        }
        None
    }

    fn resolve<'a>(&'a self, schema: &'a Value) -> Result<&'a Value, String> {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(reference) => {
                let name = reference
                    .strip_prefix("#/definitions/")
                    .ok_or_else(|| format!("unsupported $ref {reference}"))?;
                let target = &self.doc["definitions"][name];
                if target.is_null() {
                    return Err(format!("dangling $ref {reference}"));
                }
                self.resolve(target)
            }
            None => Ok(schema),
        }
    }

    pub fn validate(&self, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
        let schema = self.resolve(schema)?;
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
            if !allowed.contains(value) {
                return Err(format!("{at}: {value} is not one of {allowed:?}"));
            }
        }
        let kind = schema.get("type").and_then(Value::as_str).unwrap_or(
            if schema.get("properties").is_some() {
                "object"
            } else {
                "any"
            },
        );
        match kind {
            "object" => {
                let object = value
                    .as_object()
                    .ok_or_else(|| format!("{at}: expected an object, got {value}"))?;
                let properties = schema.get("properties").and_then(Value::as_object);
                for required in schema
                    .get("required")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let name = required.as_str().unwrap_or_default();
                    if !object.contains_key(name) {
                        return Err(format!("{at}: required field `{name}` is missing"));
                    }
                }
                for (name, field) in object {
                    match properties.and_then(|p| p.get(name)) {
                        Some(field_schema) => {
                            self.validate(field_schema, field, &format!("{at}.{name}"))?
                        }
                        None => match schema.get("additionalProperties") {
                            Some(Value::Bool(true)) => {}
                            Some(extra) if extra.is_object() => {
                                self.validate(extra, field, &format!("{at}.{name}"))?
                            }
                            _ => return Err(format!("{at}: unknown field `{name}`")),
                        },
                    }
                }
            }
            "array" => {
                let items = value
                    .as_array()
                    .ok_or_else(|| format!("{at}: expected an array, got {value}"))?;
                if let Some(item_schema) = schema.get("items") {
                    for (i, item) in items.iter().enumerate() {
                        self.validate(item_schema, item, &format!("{at}[{i}]"))?;
                    }
                }
            }
            "string" => {
                value
                    .as_str()
                    .ok_or_else(|| format!("{at}: expected a string, got {value}"))?;
            }
            "boolean" => {
                value
                    .as_bool()
                    .ok_or_else(|| format!("{at}: expected a boolean, got {value}"))?;
            }
            "integer" | "number" => {
                let number = if kind == "integer" {
                    value
                        .as_i64()
                        .map(|n| n as f64)
                        .or_else(|| value.as_u64().map(|n| n as f64))
                } else {
                    value.as_f64()
                }
                .ok_or_else(|| format!("{at}: expected {kind}, got {value}"))?;
                if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
                    if number < min {
                        return Err(format!("{at}: {number} is below the minimum {min}"));
                    }
                }
                if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
                    if number > max {
                        return Err(format!("{at}: {number} is above the maximum {max}"));
                    }
                }
            }
            "any" => {}
            other => return Err(format!("{at}: unsupported schema type {other}")),
        }
        Ok(())
    }
}
