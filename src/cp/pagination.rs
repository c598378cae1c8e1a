//! Cursor pagination of the list endpoints. `?limit=` (1 to [`MAX_LIMIT`], default
//! [`DEFAULT_LIMIT`]) and `?cursor=` are optional; the answer keeps the reference's shape (a bare
//! JSON array) and, when more rows follow, says so in `X-Next-Cursor` and
//! `Link: <...>; rel="next"`, so a client that never paginates still learns that it saw only
//! the first page. Cursors are opaque: a versioned, base64url-encoded keyset (the last row's sort
//! key), stable under inserts because each page reads strictly after it.

use axum::extract::{FromRequestParts, OriginalUri, Query};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::DateTime;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::ApiError;
use crate::db::page::Keyset;

/// Rows per page when `limit` is not given: the maximum, so a client that does not paginate
/// sees as much as one answer may hold.
pub const DEFAULT_LIMIT: usize = 1000;
/// The most rows one answer holds.
pub const MAX_LIMIT: usize = 1000;

pub const NEXT_CURSOR_HEADER: HeaderName = HeaderName::from_static("x-next-cursor");

/// Which page to read: up to `limit` rows after `after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    pub after: Keyset,
    pub limit: usize,
}

impl Default for PageRequest {
    fn default() -> Self {
        Self {
            after: Keyset::START,
            limit: DEFAULT_LIMIT,
        }
    }
}

impl PageRequest {
    /// The rows a query fetches: one more than the page, to learn whether another follows.
    pub fn fetch(&self) -> i64 {
        i64::try_from(self.limit)
            .unwrap_or(i64::MAX)
            .saturating_add(1)
    }

    /// Cuts `rows` (as fetched with [`PageRequest::fetch`]) to the page; the next page starts
    /// after its last row's key.
    pub fn page<T>(&self, mut rows: Vec<T>, key: impl Fn(&T) -> Keyset) -> Page<T> {
        let next = if rows.len() > self.limit {
            rows.truncate(self.limit);
            rows.last().map(key)
        } else {
            None
        };
        Page { items: rows, next }
    }
}

/// One page of a list and where the next one starts, if there is one.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<Keyset>,
}

impl<T> Page<T> {
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U> {
        Page {
            items: self.items.into_iter().map(f).collect(),
            next: self.next,
        }
    }
}

const CURSOR_VERSION: u8 = 1;
const CURSOR_BYTES: usize = 1 + 1 + 8 + 16;

pub fn encode_cursor(at: &Keyset) -> String {
    let mut bytes = Vec::with_capacity(CURSOR_BYTES);
    bytes.push(CURSOR_VERSION);
    bytes.push(u8::from(at.later));
    bytes.extend_from_slice(&at.created_at.timestamp_micros().to_be_bytes());
    bytes.extend_from_slice(at.id.as_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

#[derive(Debug, thiserror::Error)]
#[error("invalid query parameter `cursor`: not a cursor this API issued (pass the X-Next-Cursor of the previous page as it was)")]
pub struct BadCursor;

pub fn decode_cursor(text: &str) -> Result<Keyset, BadCursor> {
    let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| BadCursor)?;
    let [CURSOR_VERSION, later @ (0 | 1), rest @ ..] = bytes.as_slice() else {
        return Err(BadCursor);
    };
    let (micros, id) = rest.split_at_checked(8).ok_or(BadCursor)?;
    let micros = i64::from_be_bytes(micros.try_into().map_err(|_| BadCursor)?);
    let id = Uuid::from_slice(id).map_err(|_| BadCursor)?;
    let created_at = DateTime::from_timestamp_micros(micros).ok_or(BadCursor)?;
    Ok(Keyset {
        later: *later == 1,
        created_at,
        id,
    })
}

#[derive(Debug, Deserialize)]
struct RawPageQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

fn parse_limit(raw: &str) -> Result<usize, ApiError> {
    match raw.parse::<usize>() {
        Ok(limit @ 1..=MAX_LIMIT) => Ok(limit),
        _ => Err(ApiError::InvalidRequest(format!(
            "invalid query parameter `limit`: `{raw}` is not a whole number from 1 to {MAX_LIMIT}"
        ))),
    }
}

/// `?limit=&cursor=` of a list request, and the path the next page's link names.
#[derive(Debug, Clone)]
pub struct PageQuery {
    pub request: PageRequest,
    limit_given: bool,
    path: String,
}

impl<S: Send + Sync> FromRequestParts<S> for PageQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(raw) = Query::<RawPageQuery>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::InvalidRequest(rejection.body_text()))?;
        let mut request = PageRequest::default();
        if let Some(limit) = &raw.limit {
            request.limit = parse_limit(limit)?;
        }
        if let Some(cursor) = &raw.cursor {
            request.after =
                decode_cursor(cursor).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
        }
        let path = parts
            .extensions
            .get::<OriginalUri>()
            .map_or_else(|| parts.uri.path(), |OriginalUri(uri)| uri.path())
            .to_owned();
        Ok(PageQuery {
            request,
            limit_given: raw.limit.is_some(),
            path,
        })
    }
}

impl PageQuery {
    /// The answer: the page's rows as a bare array, and the next page's cursor and link.
    pub fn answer<T: Serialize>(&self, page: Page<T>) -> Response {
        let mut response = Json(page.items).into_response();
        if let Some(next) = page.next {
            let cursor = encode_cursor(&next);
            let limit = if self.limit_given {
                format!("limit={}&", self.request.limit)
            } else {
                String::new()
            };
            let link = format!("<{}?{limit}cursor={cursor}>; rel=\"next\"", self.path);
            let headers = response.headers_mut();
            if let (Ok(cursor), Ok(link)) =
                (HeaderValue::from_str(&cursor), HeaderValue::from_str(&link))
            {
                headers.insert(NEXT_CURSOR_HEADER, cursor);
                headers.insert(axum::http::header::LINK, link);
            }
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_anything_else_is_refused() {
        let at = Keyset {
            later: true,
            created_at: DateTime::from_timestamp_micros(1_767_323_045_123_456).unwrap(),
            id: Uuid::from_u128(0x1234_5678_9abc_def0_1234_5678_9abc_def0),
        };
        let text = encode_cursor(&at);
        assert_eq!(decode_cursor(&text).unwrap(), at);
        assert_eq!(
            decode_cursor(&encode_cursor(&Keyset::START)).unwrap(),
            Keyset::START
        );
        for bad in [
            "",
            "x",
            "!!!!",
            &text[..text.len() - 2],
            &format!("{text}AA"),
        ] {
            assert!(decode_cursor(bad).is_err(), "{bad}");
        }
        let mut wrong_version = URL_SAFE_NO_PAD.decode(&text).unwrap();
        wrong_version[0] = 2;
        assert!(decode_cursor(&URL_SAFE_NO_PAD.encode(&wrong_version)).is_err());
    }

    #[test]
    fn limits_are_whole_numbers_up_to_the_maximum() {
        assert_eq!(parse_limit("1").unwrap(), 1);
        assert_eq!(parse_limit("1000").unwrap(), MAX_LIMIT);
        for bad in ["0", "1001", "-1", "ten", "", "1.5"] {
            assert!(parse_limit(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_page_is_cut_at_its_limit_and_names_where_the_next_starts() {
        let request = PageRequest {
            after: Keyset::START,
            limit: 2,
        };
        assert_eq!(request.fetch(), 3);
        let key = |n: &u128| Keyset::of(DateTime::UNIX_EPOCH, Uuid::from_u128(*n));
        let full = request.page(vec![1, 2, 3], key);
        assert_eq!((full.items, full.next), (vec![1, 2], Some(key(&2))));
        let last = request.page(vec![1, 2], key);
        assert_eq!((last.items, last.next), (vec![1, 2], None));
    }
}
