//! What every request handler shares: the database pool and the token keys.

use std::ops::Deref;
use std::sync::Arc;

use super::tokens::TokenKeys;
use crate::db::Db;

#[derive(Debug)]
pub struct Shared {
    pub db: Db,
    pub tokens: TokenKeys,
}

/// Cheap to clone: axum clones it into every request.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(db: Db, tokens: TokenKeys) -> Self {
        Self(Arc::new(Shared { db, tokens }))
    }
}

impl Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}
