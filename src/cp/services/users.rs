//! Platform admins' management of accounts.

use serde_json::json;

use super::{user_action, Caller, ServiceError};
use crate::cp::revocations::{self, Revoked};
use crate::db::users::{self, UserStatus};
use crate::db::{api_keys, audit_logs, Db, DbError};
use crate::id::UserId;

/// Enables or disables an account. A disabled account cannot sign in, its tokens stop working
/// on their next request, the API keys it created are deleted and its open sessions end.
pub async fn set_active(
    db: &Db,
    admin: &Caller,
    user: UserId,
    active: bool,
) -> Result<(), ServiceError> {
    if !active && user == admin.user {
        return Err(ServiceError::invalid(
            "active",
            "you cannot disable your own account",
        ));
    }
    let status = if active {
        UserStatus::Active
    } else {
        UserStatus::Disabled
    };
    let mut tx = db.begin().await.map_err(DbError::from)?;
    if !users::set_status(&mut *tx, user.uuid(), status).await? {
        return Err(ServiceError::NotFound("user"));
    }
    let mut deleted_keys = 0;
    if !active {
        let keys = api_keys::delete_created_by(&mut *tx, user.uuid(), None).await?;
        deleted_keys = keys.len();
        for revoked in keys.into_iter().map(|id| Revoked::ApiKey { id }) {
            revocations::announce(&mut *tx, revoked).await?;
        }
        revocations::announce(&mut *tx, Revoked::User { id: user.uuid() }).await?;
    }
    let entry = user_action(
        admin,
        None,
        "user",
        user.to_string(),
        if active { "enable" } else { "disable" },
        json!({"deleted_api_keys": deleted_keys}),
    );
    audit_logs::insert(&mut *tx, entry).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(())
}
