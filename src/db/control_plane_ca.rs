//! Queries on `control_plane_ca`: the one row holding the control plane's CA and the key its
//! agent secrets derive from.

use sqlx::PgExecutor;

use super::DbError;

pub struct CaRow {
    pub cert_pem: String,
    pub key_pem: String,
    pub agent_secret_key: Vec<u8>,
}

pub async fn get(ex: impl PgExecutor<'_>) -> Result<Option<CaRow>, DbError> {
    Ok(sqlx::query_as!(
        CaRow,
        "SELECT cert_pem, key_pem, agent_secret_key FROM control_plane_ca WHERE id = 1"
    )
    .fetch_optional(ex)
    .await?)
}

/// Stores `candidate` unless a CA exists; `false` when another replica's came first (read it
/// with [`get`], in a later statement so that it is visible).
pub async fn insert_if_absent(ex: impl PgExecutor<'_>, candidate: &CaRow) -> Result<bool, DbError> {
    let done = sqlx::query!(
        "INSERT INTO control_plane_ca (id, cert_pem, key_pem, agent_secret_key)
         VALUES (1, $1, $2, $3)
         ON CONFLICT (id) DO NOTHING",
        candidate.cert_pem,
        candidate.key_pem,
        candidate.agent_secret_key,
    )
    .execute(ex)
    .await?;
    Ok(done.rows_affected() == 1)
}
