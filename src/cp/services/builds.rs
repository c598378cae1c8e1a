//! Template builds: a recipe (`template::recipe`) run step by step in a capsule of its base
//! template, then flattened by the capsule's agent into a new base template image, published to
//! the template store and registered.
//!
//! The control plane replica that accepts a build runs it and renews the build's lease; a
//! replica that dies leaves a lease that runs out, and any replica's reconciler then ends the
//! build as `error` and removes its capsule. A failed or cancelled build registers nothing, and
//! its capsule, uploaded context and the agent's intermediate files are removed.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::capsules::{self, CapsuleError, NewCapsule};
use super::Caller;
use crate::agent::wire::CaptureTemplate;
use crate::cp::agent_client::AgentError;
use crate::cp::pagination::{Page, PageRequest};
use crate::cp::state::AppState;
use crate::db::builds::{self, Build, BuildStatus, LogStream};
use crate::db::page::Keyset;
use crate::db::team_members::Role;
use crate::db::templates::{self, TemplateType};
use crate::db::DbError;
use crate::envd::api::{AttachRequest, ClientMessage, ProcessSpec, RunRequest, StartRequest};
use crate::envd::client::{EnvdClient, EnvdClientError, ProcessEvent};
use crate::envd::template::TemplateConfig;
use crate::id::{HostId, SandboxId, TeamId};
use crate::store::BlobRef;
use crate::template::recipe::{self, Healthcheck, Instruction, Recipe, RecipeError};
use crate::template::{TemplateName, DEFAULT_TEMPLATE};

/// How often the running replica renews a build's lease, and looks for a cancel.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// A lease this old means the replica running the build is gone.
pub const ABANDONED_AFTER: Duration = Duration::from_secs(60);
/// Where the uploaded context is unpacked inside the build capsule; removed before the image is
/// taken.
const CONTEXT_DIR: &str = "/var/tmp/wrenn-build/context";
const CONTEXT_TAR: &str = "/var/tmp/wrenn-build/context.tar";
/// Log lines kept per build; a step printing more is cut with one notice.
const MAX_LOG_LINES: usize = 50_000;
const MAX_LOG_LINE: usize = 4096;
/// Flattening reads the whole image out of the guest and writes a new one.
const CAPTURE_TIMEOUT: Duration = Duration::from_secs(1800);
/// How long a healthcheck without a retry limit may keep failing.
const HEALTHY_WITHIN: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("recipe {0}")]
    Recipe(RecipeError),
    #[error("template `{0}` not found")]
    TemplateNotFound(String),
    #[error("template `{0}` is protected; builds cannot replace it")]
    Protected(String),
    #[error("a build of template `{0}` is already in progress")]
    InProgress(String),
    #[error("template `{0}` is a snapshot template; builds make base templates")]
    SnapshotExists(String),
    #[error("build not found")]
    NotFound,
    #[error("only platform admins (platform templates) and team owners (their team's templates) build templates")]
    NotOwner,
    #[error("the build is {0}; only a build in progress can be cancelled")]
    Finished(&'static str),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl BuildError {
    fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            message: message.into(),
        }
    }
}

/// `POST /v1/admin/builds`.
#[derive(Debug, Clone)]
pub struct NewBuild {
    pub name: String,
    pub base_template: Option<String>,
    pub recipe: String,
    pub healthcheck: Option<String>,
    pub vcpus: Option<u32>,
    pub memory_mb: Option<u32>,
}

/// A build as the API shows it.
#[derive(Debug, Serialize)]
pub struct BuildView {
    pub id: Uuid,
    pub name: String,
    pub base_template: String,
    pub status: &'static str,
    pub current_step: i32,
    pub total_steps: i32,
    pub error: Option<String>,
    pub capsule_id: Option<String>,
    pub host_id: Option<String>,
    pub recipe: String,
    pub healthcheck: Option<String>,
    pub vcpus: i32,
    pub memory_mb: i32,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    pub completed_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl From<Build> for BuildView {
    fn from(b: Build) -> Self {
        Self {
            id: b.id,
            name: b.name,
            base_template: b.base_template,
            status: b.status.as_str(),
            current_step: b.current_step,
            total_steps: b.total_steps,
            error: b.error,
            capsule_id: b.sandbox_id.map(|id| SandboxId(id).to_string()),
            host_id: b.host_id.map(|id| HostId(id).to_string()),
            recipe: b.recipe,
            healthcheck: b.healthcheck,
            vcpus: b.vcpus,
            memory_mb: b.memory_mb,
            created_at: b.created_at,
            started_at: b.started_at,
            completed_at: b.completed_at,
        }
    }
}

/// Checks the request, records the build and starts it in this replica. `context` is the
/// uploaded archive, already checked and rewritten as a plain tar; the build removes it.
/// Whose templates a caller builds: a platform admin the platform's, a team owner the team's.
pub fn builder_team(caller: &Caller) -> Result<TeamId, BuildError> {
    if caller.is_admin {
        Ok(TeamId::PLATFORM)
    } else if caller.role == Some(Role::Owner) {
        Ok(caller.team)
    } else {
        Err(BuildError::NotOwner)
    }
}

pub async fn submit(
    state: &AppState,
    caller: &Caller,
    new: NewBuild,
    context: Option<tempfile::TempPath>,
) -> Result<Build, BuildError> {
    let team = builder_team(caller)?;
    let name: TemplateName =
        new.name
            .parse()
            .map_err(|e: crate::template::TemplateNameError| {
                BuildError::invalid("name", e.to_string())
            })?;
    if team == TeamId::PLATFORM && templates::looks_like_team_image(name.as_str()) {
        return Err(BuildError::invalid(
            "name",
            "names ending in `.t` and 32 hex digits are reserved for team images",
        ));
    }
    if team != TeamId::PLATFORM && name.as_str().len() > templates::MAX_TEAM_TEMPLATE_NAME_LEN {
        return Err(BuildError::invalid(
            "name",
            format!(
                "a team template's name has at most {} characters",
                templates::MAX_TEAM_TEMPLATE_NAME_LEN
            ),
        ));
    }
    let recipe = Recipe::parse(&new.recipe).map_err(BuildError::Recipe)?;
    let healthcheck = new
        .healthcheck
        .as_deref()
        .filter(|h| !h.trim().is_empty())
        .map(Healthcheck::parse)
        .transpose()
        .map_err(|e| BuildError::invalid("healthcheck", e.message))?;
    let asked_base = new
        .base_template
        .as_deref()
        .map(str::parse::<TemplateName>)
        .transpose()
        .map_err(|e| BuildError::invalid("base_template", e.to_string()))?;
    let base = match (&recipe.from, asked_base) {
        (Some(from), Some(asked)) if *from != asked => {
            return Err(BuildError::invalid(
                "base_template",
                format!("the recipe says FROM {from} but base_template is {asked}"),
            ))
        }
        (Some(from), _) => from.clone(),
        (None, Some(asked)) => asked,
        (None, None) => DEFAULT_TEMPLATE
            .parse()
            .expect("the default template name is valid"),
    };
    if recipe.copies() && context.is_none() {
        return Err(BuildError::invalid(
            "archive",
            "the recipe has COPY; upload the files as a multipart `archive` part",
        ));
    }
    let base_row = templates::visible_by_name(&state.db, team.uuid(), base.as_str())
        .await?
        .ok_or_else(|| BuildError::TemplateNotFound(base.to_string()))?;
    if base_row.template_type != TemplateType::Base {
        return Err(BuildError::invalid(
            "base_template",
            format!("`{base}` is a snapshot template; builds start from base templates"),
        ));
    }
    let existing = templates::visible_by_name(&state.db, team.uuid(), name.as_str())
        .await?
        .filter(|t| t.team_id == team.uuid());
    if let Some(existing) = existing {
        if existing.protected {
            return Err(BuildError::Protected(name.to_string()));
        }
        if existing.template_type == TemplateType::Snapshot {
            return Err(BuildError::SnapshotExists(name.to_string()));
        }
    }
    let vcpus = new
        .vcpus
        .map_or(base_row.vcpus, |v| i32::try_from(v).unwrap_or(i32::MAX));
    let memory_mb = new
        .memory_mb
        .map_or(base_row.memory_mb, |m| i32::try_from(m).unwrap_or(i32::MAX));
    if !(1..=32).contains(&vcpus) {
        return Err(BuildError::invalid("vcpus", "must be between 1 and 32"));
    }
    if !(128..=65536).contains(&memory_mb) {
        return Err(BuildError::invalid(
            "memory_mb",
            "must be between 128 and 65536",
        ));
    }
    let total_steps = i32::try_from(recipe.steps.len()).unwrap_or(i32::MAX);
    let inserted = builds::insert(
        &state.db,
        builds::NewBuild {
            id: Uuid::new_v4(),
            team_id: team.uuid(),
            name: name.as_str(),
            base_template: base.as_str(),
            recipe: &new.recipe,
            healthcheck: new.healthcheck.as_deref(),
            vcpus,
            memory_mb,
            total_steps,
            created_by: caller.user.uuid(),
        },
    )
    .await;
    let build = match inserted {
        Ok(build) => build,
        Err(DbError::UniqueViolation { constraint })
            if constraint == "template_builds_one_active" =>
        {
            return Err(BuildError::InProgress(name.to_string()))
        }
        Err(error) => return Err(error.into()),
    };
    let worker = Worker {
        state: state.clone(),
        build: build.clone(),
        team,
        name,
        base,
        recipe,
        healthcheck,
        context,
        cancel: CancellationToken::new(),
        log_lines: 0,
    };
    tokio::spawn(worker.run());
    Ok(build)
}

pub async fn get(state: &AppState, team: TeamId, id: Uuid) -> Result<Build, BuildError> {
    builds::get(&state.db, team.uuid(), id)
        .await?
        .ok_or(BuildError::NotFound)
}

pub async fn list(
    state: &AppState,
    team: TeamId,
    page: PageRequest,
) -> Result<Page<Build>, BuildError> {
    let rows = builds::page(&state.db, team.uuid(), page.after, page.fetch()).await?;
    Ok(page.page(rows, |b| Keyset::of(b.created_at, b.id)))
}

/// Ends the build as `cancelled`; its replica notices within a heartbeat, stops the step in
/// progress and removes what the build made.
pub async fn cancel(state: &AppState, team: TeamId, id: Uuid) -> Result<Build, BuildError> {
    let build = get(state, team, id).await?;
    if !builds::finish(
        &state.db,
        id,
        BuildStatus::Cancelled,
        Some("cancelled"),
        None,
    )
    .await?
    {
        let now = get(state, team, id).await?;
        return Err(BuildError::Finished(now.status.as_str()));
    }
    builds::log(&state.db, id, LogStream::Failure, "build cancelled").await?;
    tracing::info!(build = %build.id, "build cancelled");
    get(state, team, id).await
}

/// Ends the builds whose replica stopped renewing their lease, and removes their capsules.
pub async fn end_abandoned(state: &AppState) -> Result<usize, DbError> {
    let abandoned = builds::end_abandoned(&state.db, ABANDONED_AFTER.as_secs_f64()).await?;
    for build in &abandoned {
        tracing::warn!(build = %build.id, "build abandoned by its control plane; ended as error");
        if let Some(sandbox) = build.sandbox_id {
            if let Err(error) =
                capsules::destroy(state, TeamId(build.team_id), SandboxId(sandbox)).await
            {
                tracing::warn!(build = %build.id, %error, "could not remove an abandoned build's capsule");
            }
        }
    }
    Ok(abandoned.len())
}

/// Why a build stopped short.
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error("cancelled")]
    Cancelled,
    #[error("line {line}: {message}")]
    Line { line: usize, message: String },
    #[error("{0}")]
    Other(String),
}

impl From<DbError> for StepError {
    fn from(e: DbError) -> Self {
        Self::Other(e.to_string())
    }
}

impl From<CapsuleError> for StepError {
    fn from(e: CapsuleError) -> Self {
        Self::Other(e.to_string())
    }
}

impl From<AgentError> for StepError {
    fn from(e: AgentError) -> Self {
        Self::Other(e.to_string())
    }
}

impl From<EnvdClientError> for StepError {
    fn from(e: EnvdClientError) -> Self {
        Self::Other(format!("envd: {e}"))
    }
}

/// What the steps so far decided about the template.
#[derive(Default)]
struct Context {
    env: BTreeMap<String, String>,
    /// The guest's own environment, for `$VAR` expansion of names no ENV set.
    guest_env: BTreeMap<String, String>,
    user: Option<String>,
    /// Who steps run as before any USER: the base template's default user.
    base_user: Option<String>,
    workdir: Option<String>,
    start: Vec<StartRequest>,
}

impl Context {
    fn process(&self, cmd: &str, args: &[&str]) -> ProcessSpec {
        ProcessSpec {
            cmd: cmd.to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            envs: self.env.clone(),
            cwd: self.workdir.clone(),
            user: self.user.clone(),
        }
    }

    fn as_root(&self, script: &str) -> ProcessSpec {
        ProcessSpec {
            user: Some("root".into()),
            cwd: Some("/".into()),
            ..self.process("/bin/sh", &["-c", script])
        }
    }

    fn template_config(&self) -> TemplateConfig {
        TemplateConfig {
            env: self.env.clone(),
            user: self.user.clone(),
            workdir: self.workdir.clone(),
            start: self.start.clone(),
        }
    }
}

struct Worker {
    state: AppState,
    build: Build,
    team: TeamId,
    name: TemplateName,
    base: TemplateName,
    recipe: Recipe,
    healthcheck: Option<Healthcheck>,
    context: Option<tempfile::TempPath>,
    cancel: CancellationToken,
    log_lines: usize,
}

impl Worker {
    async fn run(mut self) {
        let id = self.build.id;
        let db = self.state.db.clone();
        if !matches!(builds::start(&db, id).await, Ok(true)) {
            return;
        }
        let heartbeat = tokio::spawn(renew_lease(db.clone(), id, self.cancel.clone()));
        let mut capsule = None;
        let outcome = self.steps(&mut capsule).await;
        if let Some(capsule) = capsule {
            if let Err(error) = capsules::destroy(&self.state, self.team, capsule).await {
                tracing::warn!(build = %id, %error, "could not remove the build capsule");
                self.note(
                    LogStream::Failure,
                    &format!("could not remove the build capsule: {error}"),
                )
                .await;
            }
        }
        drop(self.context.take());
        heartbeat.abort();
        let (status, error) = match outcome {
            // Ended with the registration, in its transaction.
            Ok(_) => {
                tracing::info!(build = %id, "build succeeded");
                return;
            }
            Err(StepError::Cancelled) => (BuildStatus::Cancelled, Some("cancelled".to_owned())),
            Err(error) => {
                let message = error.to_string();
                self.note(LogStream::Failure, &format!("build failed: {message}"))
                    .await;
                (BuildStatus::Failed, Some(message))
            }
        };
        match builds::finish(&db, id, status, error.as_deref(), None).await {
            Ok(true) => tracing::info!(build = %id, status = status.as_str(), "build ended"),
            Ok(false) => tracing::info!(build = %id, "build was ended elsewhere (cancelled)"),
            Err(error) => tracing::warn!(build = %id, %error, "could not record the build's end"),
        }
    }

    async fn note(&mut self, stream: LogStream, text: &str) {
        if self.log_lines >= MAX_LOG_LINES {
            return;
        }
        self.log_lines += 1;
        let text = if self.log_lines == MAX_LOG_LINES {
            "the build log reached its size limit; later output is not kept"
        } else {
            text
        };
        let mut line: String = text.chars().take(MAX_LOG_LINE).collect();
        if line.len() < text.len() {
            line.push('…');
        }
        if let Err(error) = builds::log(&self.state.db, self.build.id, stream, &line).await {
            tracing::warn!(build = %self.build.id, %error, "could not write a build log line");
        }
    }

    fn check_cancel(&self) -> Result<(), StepError> {
        if self.cancel.is_cancelled() {
            Err(StepError::Cancelled)
        } else {
            Ok(())
        }
    }

    async fn steps(&mut self, capsule_out: &mut Option<SandboxId>) -> Result<Uuid, StepError> {
        let total = self.recipe.steps.len();
        self.note(
            LogStream::Info,
            &format!(
                "building `{}` from `{}`: {total} steps",
                self.name, self.base
            ),
        )
        .await;
        let created = capsules::create(
            &self.state,
            self.team,
            NewCapsule {
                template: self.base.clone(),
                vcpus: Some(u32::try_from(self.build.vcpus).unwrap_or(1)),
                memory_mb: Some(u32::try_from(self.build.memory_mb).unwrap_or(512)),
                timeout_sec: 0,
                public_ports: Default::default(),
                egress: Default::default(),
            },
        )
        .await?;
        let capsule_id = SandboxId(created.sandbox.id);
        *capsule_out = Some(capsule_id);
        if let Some(host) = created.sandbox.host_id {
            builds::set_capsule(&self.state.db, self.build.id, capsule_id.uuid(), host).await?;
        }
        self.note(
            LogStream::Info,
            &format!("build capsule {capsule_id} is running"),
        )
        .await;
        self.check_cancel()?;
        let running = capsules::running(&self.state, self.team, capsule_id).await?;
        let envd = self
            .state
            .capsules
            .agents
            .envd(&running.target, capsule_id)?;
        let base_user = envd
            .run(&RunRequest {
                process: ProcessSpec::new("id", &["-un"]),
                timeout_sec: Some(30),
            })
            .await?;
        let mut ctx = Context {
            guest_env: envd.envs().await?,
            base_user: Some(base_user.stdout.trim().to_owned()).filter(|u| !u.is_empty()),
            ..Context::default()
        };

        if let Some(context) = self.context.as_ref().map(|p| p.to_path_buf()) {
            let size = std::fs::metadata(&context).map(|m| m.len()).unwrap_or(0);
            self.note(
                LogStream::Info,
                &format!(
                    "uploading the build context ({})",
                    crate::progress::Bytes(size)
                ),
            )
            .await;
            self.run_checked(
                &envd,
                0,
                ctx.as_root("mkdir -p /var/tmp/wrenn-build"),
                Duration::from_secs(60),
            )
            .await?;
            let file = tokio::fs::File::open(&context)
                .await
                .map_err(|e| StepError::Other(format!("the uploaded context: {e}")))?;
            let body = tokio_util::io::ReaderStream::new(file);
            envd.write_file(CONTEXT_TAR, Some("root"), body).await?;
            let unpack = format!(
                "set -e; mkdir -p {CONTEXT_DIR}; tar -xf {CONTEXT_TAR} -C {CONTEXT_DIR}; rm -f {CONTEXT_TAR}; chmod -R a+rX /var/tmp/wrenn-build"
            );
            self.run_checked(&envd, 0, ctx.as_root(&unpack), Duration::from_secs(600))
                .await?;
        }

        for index in 0..total {
            self.check_cancel()?;
            let step = self.recipe.steps[index].clone();
            builds::set_step(
                &self.state.db,
                self.build.id,
                i32::try_from(index + 1).unwrap_or(i32::MAX),
            )
            .await?;
            self.note(
                LogStream::Step,
                &format!(
                    "step {}/{total} (line {}): {}",
                    index + 1,
                    step.line,
                    step.instruction.summary()
                ),
            )
            .await;
            self.step(&envd, &mut ctx, step.line, &step.instruction)
                .await?;
        }

        if let Some(check) = self.healthcheck.clone() {
            self.check_health(&envd, &ctx, &check).await?;
        }
        self.check_cancel()?;
        self.run_checked(
            &envd,
            0,
            ctx.as_root("rm -rf /var/tmp/wrenn-build"),
            Duration::from_secs(120),
        )
        .await?;

        self.note(LogStream::Info, "taking the image").await;
        let capture = CaptureTemplate {
            template: templates::image_name(self.team, self.name.as_str()),
            config: ctx.template_config(),
        };
        // The agent finishes a capture it began whatever this side does, so a cancel is looked
        // at once it is done; the image it made is then removed again.
        let blob = self
            .state
            .capsules
            .agents
            .capture_template(&running.target, capsule_id, &capture, CAPTURE_TIMEOUT)
            .await?;
        match self.register(&blob).await {
            Ok(template) => Ok(template),
            Err(error) => {
                if let Err(cleanup) = self
                    .state
                    .capsules
                    .agents
                    .remove_template(
                        &running.target,
                        &templates::image_name(self.team, self.name.as_str()),
                    )
                    .await
                {
                    tracing::warn!(build = %self.build.id, error = %cleanup, "could not remove an unregistered build image from its host");
                }
                Err(error)
            }
        }
    }

    /// Registers the captured image and ends the build `success` in one transaction, so a
    /// cancel that arrived meanwhile registers nothing.
    async fn register(&mut self, blob: &BlobRef) -> Result<Uuid, StepError> {
        self.check_cancel()?;
        if let Some(store) = &self.state.capsules.store {
            store.check(blob).await.map_err(|e| {
                StepError::Other(format!(
                    "the control plane cannot find the captured image in the template store: {e}"
                ))
            })?;
        }
        let metadata = serde_json::json!({
            "description": format!("built from {} by build {}", self.base, self.build.id),
            "base_template": self.base.as_str(),
            "build_id": self.build.id.to_string(),
        });
        let mut tx = self.state.db.begin().await.map_err(DbError::from)?;
        let template = templates::upsert_built(
            &mut *tx,
            templates::BuiltTemplate {
                team_id: self.team.uuid(),
                name: self.name.as_str(),
                vcpus: self.build.vcpus,
                memory_mb: self.build.memory_mb,
                size_bytes: i64::try_from(blob.size_bytes).unwrap_or(i64::MAX),
                image_sha256: &blob.sha256,
                metadata,
            },
        )
        .await?
        .ok_or_else(|| {
            StepError::Other(format!(
                "template `{}` became protected or a snapshot template",
                self.name
            ))
        })?;
        if !builds::finish(
            &mut *tx,
            self.build.id,
            BuildStatus::Success,
            None,
            Some(template),
        )
        .await?
        {
            return Err(StepError::Cancelled);
        }
        tx.commit().await.map_err(DbError::from)?;
        self.note(
            LogStream::Info,
            &format!(
                "registered template `{}` (sha256:{}, {})",
                self.name,
                blob.sha256,
                crate::progress::Bytes(blob.size_bytes)
            ),
        )
        .await;
        Ok(template)
    }

    async fn step(
        &mut self,
        envd: &EnvdClient,
        ctx: &mut Context,
        line: usize,
        instruction: &Instruction,
    ) -> Result<(), StepError> {
        match instruction {
            Instruction::Run { command, timeout } => {
                let spec = ctx.process("/bin/sh", &["-c", command]);
                self.run_checked(envd, line, spec, *timeout).await
            }
            Instruction::Env(pairs) => {
                for (key, value) in pairs {
                    let mut visible = ctx.guest_env.clone();
                    visible.extend(ctx.env.clone());
                    let expanded = recipe::expand(value, &visible);
                    ctx.env.insert(key.clone(), expanded);
                }
                Ok(())
            }
            Instruction::Workdir(dir) => {
                let mut script = format!("mkdir -p {}", quote(dir));
                let owner = ctx.user.as_deref().or(ctx.base_user.as_deref());
                if let Some(user) = owner.filter(|u| *u != "root") {
                    script.push_str(&format!(" && chown {} {}", quote(user), quote(dir)));
                }
                self.run_checked(envd, line, ctx.as_root(&script), Duration::from_secs(60))
                    .await?;
                ctx.workdir = Some(dir.clone());
                Ok(())
            }
            Instruction::User(user) => {
                let name = quote(user);
                // useradd (Debian), adduser (Alpine), or the account files themselves where
                // the image has neither (busybox).
                let script = format!(
                    "id -u {name} >/dev/null 2>&1 && exit 0; \
                     if command -v useradd >/dev/null; then exec useradd -m -s /bin/sh {name}; fi; \
                     if command -v adduser >/dev/null; then exec adduser -D {name}; fi; \
                     set -e; uid=1001; while cut -d: -f3 /etc/passwd | grep -qx \"$uid\"; do uid=$((uid + 1)); done; \
                     echo {name}:x:$uid:$uid::/home/{user}:/bin/sh >> /etc/passwd; \
                     echo {name}:x:$uid: >> /etc/group; \
                     if [ -f /etc/shadow ]; then echo {name}:*:0:0:99999:7::: >> /etc/shadow; fi; \
                     mkdir -p /home/{user}; chown $uid:$uid /home/{user}"
                );
                self.run_checked(envd, line, ctx.as_root(&script), Duration::from_secs(60))
                    .await?;
                ctx.user = Some(user.clone());
                Ok(())
            }
            Instruction::Copy { sources, dest } => {
                // As the current user, from its working directory: relative destinations
                // resolve there and the copies belong to the user without a chown. A directory
                // source copies its contents, as in a Dockerfile.
                let quoted: Vec<String> = sources.iter().map(|s| quote(s)).collect();
                let several = if sources.len() > 1 || dest.ends_with('/') {
                    "mkdir -p \"$dest\"; "
                } else {
                    ""
                };
                let script = format!(
                    "set -e; dest={dest}; case \"$dest\" in /*) ;; *) dest=\"$PWD/$dest\";; esac; {several}cd {CONTEXT_DIR}; for source in {sources}; do if [ -d \"$source\" ]; then mkdir -p \"$dest\"; cp -R \"$source/.\" \"$dest/\"; else cp \"$source\" \"$dest\"; fi; done",
                    dest = quote(dest),
                    sources = quoted.join(" "),
                );
                let spec = ctx.process("/bin/sh", &["-c", &script]);
                self.run_checked(envd, line, spec, Duration::from_secs(600))
                    .await
            }
            Instruction::Start(command) => {
                let tag = format!("start-{}", ctx.start.len() + 1);
                ctx.start.push(StartRequest {
                    process: ctx.process("/bin/sh", &["-c", command]),
                    tag: Some(tag),
                    pty: None,
                });
                Ok(())
            }
        }
    }

    /// Waits, unless the build is cancelled first.
    async fn pause(&self, wait: Duration) -> Result<(), StepError> {
        tokio::select! {
            () = tokio::time::sleep(wait) => Ok(()),
            () = self.cancel.cancelled() => Err(StepError::Cancelled),
        }
    }

    /// Runs a process to its end, its output going to the build log; a nonzero exit, the
    /// timeout or a cancel stops the build.
    async fn run_checked(
        &mut self,
        envd: &EnvdClient,
        line: usize,
        process: ProcessSpec,
        timeout: Duration,
    ) -> Result<(), StepError> {
        let fail = |message: String| {
            if line == 0 {
                StepError::Other(message)
            } else {
                StepError::Line { line, message }
            }
        };
        let mut session = envd
            .attach(&AttachRequest::Start(StartRequest {
                process,
                tag: None,
                pty: None,
            }))
            .await?;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut out = LineBuffer::default();
        let mut err = LineBuffer::default();
        let exit = loop {
            let event = tokio::select! {
                event = session.next_event() => event?,
                () = &mut deadline => {
                    let _ = session.send(&ClientMessage::Kill).await;
                    return Err(fail(format!("timed out after {}s and was killed", timeout.as_secs())));
                }
                () = self.cancel.cancelled() => {
                    let _ = session.send(&ClientMessage::Kill).await;
                    return Err(StepError::Cancelled);
                }
            };
            match event {
                Some(ProcessEvent::Stdout(data) | ProcessEvent::Pty(data)) => {
                    for text in out.push(&data) {
                        self.note(LogStream::Stdout, &text).await;
                    }
                }
                Some(ProcessEvent::Stderr(data)) => {
                    for text in err.push(&data) {
                        self.note(LogStream::Stderr, &text).await;
                    }
                }
                Some(ProcessEvent::Lost(bytes)) => {
                    self.note(LogStream::Info, &format!("({bytes} bytes of output lost)"))
                        .await;
                }
                Some(ProcessEvent::Error(error)) => {
                    return Err(fail(format!("envd: {}", error.message)));
                }
                Some(ProcessEvent::Exit(exit)) => break exit,
                None => {
                    return Err(fail(
                        "the process session ended before the process did".into(),
                    ))
                }
            }
        };
        for text in out.rest() {
            self.note(LogStream::Stdout, &text).await;
        }
        for text in err.rest() {
            self.note(LogStream::Stderr, &text).await;
        }
        if exit.exit_code != 0 {
            return Err(fail(format!("exited with status {}", exit.exit_code)));
        }
        Ok(())
    }

    /// Starts the template's START processes and waits until the healthcheck passes.
    async fn check_health(
        &mut self,
        envd: &EnvdClient,
        ctx: &Context,
        check: &Healthcheck,
    ) -> Result<(), StepError> {
        for start in &ctx.start {
            envd.start(start).await?;
        }
        self.note(LogStream::Step, &format!("healthcheck: {}", check.command))
            .await;
        self.pause(check.start_period).await?;
        let started = tokio::time::Instant::now();
        let mut attempt = 0u32;
        let healthy = loop {
            self.check_cancel()?;
            attempt += 1;
            let run = RunRequest {
                process: ctx.process("/bin/sh", &["-c", &check.command]),
                timeout_sec: Some(check.timeout.as_secs().max(1)),
            };
            match envd.run(&run).await {
                Ok(answer) if answer.exit_code == 0 => break true,
                Ok(answer) => {
                    let detail = answer.stderr.lines().last().unwrap_or("").to_owned();
                    self.note(
                        LogStream::Info,
                        &format!(
                            "healthcheck attempt {attempt}: exit {} {detail}",
                            answer.exit_code
                        ),
                    )
                    .await;
                }
                Err(error) => {
                    self.note(
                        LogStream::Info,
                        &format!("healthcheck attempt {attempt}: {error}"),
                    )
                    .await;
                }
            }
            let out_of_tries = check.retries > 0 && attempt >= check.retries;
            if out_of_tries || started.elapsed() > HEALTHY_WITHIN {
                break false;
            }
            self.pause(check.interval).await?;
        };
        // The image is taken from the disk; the processes start again at every boot.
        for start in &ctx.start {
            if let Some(tag) = &start.tag {
                let _ = envd.kill(tag, None).await;
            }
        }
        if !healthy {
            return Err(StepError::Other(format!(
                "the healthcheck did not pass after {attempt} attempts"
            )));
        }
        self.note(
            LogStream::Info,
            &format!("healthy after {attempt} attempts"),
        )
        .await;
        Ok(())
    }
}

/// Renews the lease until aborted; a build no longer `running` in the database (cancelled by
/// any replica) cancels the worker.
async fn renew_lease(db: crate::db::Db, id: Uuid, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    let mut renewed = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        match builds::heartbeat(&db, id).await {
            Ok(Some(BuildStatus::Running)) => renewed = tokio::time::Instant::now(),
            // Past half the lease another replica may end the build and remove its capsule:
            // stop before that.
            Err(error) if renewed.elapsed() > ABANDONED_AFTER / 2 => {
                tracing::warn!(build = %id, %error, "the build's lease could not be renewed; stopping it");
                cancel.cancel();
                return;
            }
            Err(_) => {}
            Ok(_) => {
                cancel.cancel();
                return;
            }
        }
    }
}

/// Splits output into lines for the log; a line longer than the log keeps is cut there.
#[derive(Default)]
struct LineBuffer(Vec<u8>);

impl LineBuffer {
    fn push(&mut self, data: &[u8]) -> Vec<String> {
        self.0.extend_from_slice(data);
        let mut lines = Vec::new();
        while let Some(end) = self.0.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.0.drain(..=end).collect();
            lines.push(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
        }
        if self.0.len() > MAX_LOG_LINE {
            let line: Vec<u8> = std::mem::take(&mut self.0);
            lines.push(String::from_utf8_lossy(&line).into_owned());
        }
        lines
    }

    fn rest(&mut self) -> Vec<String> {
        if self.0.is_empty() {
            return Vec::new();
        }
        vec![String::from_utf8_lossy(&std::mem::take(&mut self.0)).into_owned()]
    }
}

/// POSIX single-quoting.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_becomes_log_lines() {
        let mut buffer = LineBuffer::default();
        assert_eq!(buffer.push(b"one\ntw"), ["one"]);
        assert_eq!(buffer.push(b"o\nthree"), ["two"]);
        assert_eq!(buffer.rest(), ["three"]);
        assert!(buffer.rest().is_empty());
        let long = vec![b'x'; MAX_LOG_LINE + 1];
        assert_eq!(buffer.push(&long).len(), 1);
    }

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(quote("it's"), "'it'\\''s'");
    }
}
