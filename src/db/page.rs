//! Keyset pagination: a list query reads the rows strictly after a [`Keyset`] in its order, from
//! an index, so a page costs the same wherever it is in the list and rows inserted meanwhile
//! neither repeat nor push others out of the walk.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A position in a list ordered by `(later, created_at, id)`: `later` is false for every row of
/// a list with one group, and sorts a list's second group (a user's non-default teams) after
/// its first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keyset {
    pub later: bool,
    pub created_at: DateTime<Utc>,
    pub id: Uuid,
}

impl Keyset {
    /// Before every row: nothing was created before the Unix epoch.
    pub const START: Keyset = Keyset {
        later: false,
        created_at: DateTime::UNIX_EPOCH,
        id: Uuid::nil(),
    };

    pub fn of(created_at: DateTime<Utc>, id: Uuid) -> Self {
        Self {
            later: false,
            created_at,
            id,
        }
    }
}
