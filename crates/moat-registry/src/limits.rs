//! Every bound the registry client holds, with its unit and its reason. The time budget of a
//! whole review lives with the server's other bounds (`moat_server::limits::REGISTRY_BUDGET`):
//! this crate takes a deadline.

use std::time::Duration;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Largest manifest or index read from a registry. Real ones are a few KiB (an index of a dozen
/// platforms with their attestations, a manifest of a hundred layers: tens of KiB);
/// distribution accepts up to 4 MiB, which times [`MAX_CALLS_IN_FLIGHT`] would be more memory
/// than moat's whole limit, for images nobody builds.
pub const MAX_MANIFEST_BYTES: usize = 256 * KIB;

/// Registry calls in flight at once, all registries together: each holds at most one body of
/// [`MAX_MANIFEST_BYTES`] while it reads it. More wait their turn (within their review's
/// deadline).
pub const MAX_CALLS_IN_FLIGHT: usize = 64;

/// Registry calls in flight at once to one registry (as the metrics label it: a registry a rule
/// names, or all others together), so one slow registry holds at most a quarter of the calls
/// and the others' reviews go on.
pub const MAX_CALLS_IN_FLIGHT_PER_REGISTRY: usize = MAX_CALLS_IN_FLIGHT / 4;

/// Of [`MAX_CALLS_IN_FLIGHT_PER_REGISTRY`], what one namespace may hold at once: half, so a
/// namespace whose calls hang (at a registry it runs, under `unmatched: pin`) leaves the other
/// half to the others. When the slots are all taken, the next goes to the waiting namespaces
/// in turn (`crate::slots`), not first come, first served.
pub const MAX_CALLS_PER_REGISTRY_PER_NAMESPACE: usize = MAX_CALLS_IN_FLIGHT_PER_REGISTRY / 2;

/// Of [`MAX_CALLS_IN_FLIGHT`], what one namespace may hold at once, for the same reason.
pub const MAX_CALLS_IN_FLIGHT_PER_NAMESPACE: usize = MAX_CALLS_IN_FLIGHT / 2;

/// Image lookups of one namespace waiting on registries at once (each image of a review not
/// in the cache is one, whether it calls or joins a call in flight). Reviews are not the unit:
/// 8 reviews of 256 images each were 2,048 lookups queued ahead of every other namespace's. A
/// lookup over the bound is denied at once without a call ("retry"); the images looked up
/// meanwhile are in the cache for the retry.
pub const MAX_WAITING_LOOKUPS_PER_NAMESPACE: usize = 64;

/// Image lookups waiting on registries at once, all namespaces: what the waiting futures may
/// hold together ([`LOOKUP_BYTES`] each).
pub const MAX_WAITING_LOOKUPS: usize = 1024;

/// Of [`MAX_WAITING_LOOKUPS`], the last quarter is kept for namespaces with few lookups waiting
/// ([`MAX_RESERVED_LOOKUPS_PER_NAMESPACE`] each): 12 namespaces at their
/// [`MAX_WAITING_LOOKUPS_PER_NAMESPACE`] fill the rest, and another namespace's next pod must
/// still be looked up, not refused because moat is busy.
pub const RESERVED_LOOKUPS: usize = MAX_WAITING_LOOKUPS / 4;

/// Lookups one namespace may hold from [`RESERVED_LOOKUPS`]: a pod's handful of images.
pub const MAX_RESERVED_LOOKUPS_PER_NAMESPACE: usize = 4;

/// Distinct images one review may ask about. A pod names a handful; the tenant writes it,
/// though, and one of 60,000 distinct images would otherwise be 60,000 lookups started at once
/// (each a future of a few KiB: more memory than moat's limit) for one review. More is denied
/// without a registry call.
pub const MAX_IMAGES_PER_REVIEW: usize = 256;

/// Reviews of one namespace waiting on registries at once (those with an image not in the
/// cache). Each holds one of the webhook's decision slots for up to its registry budget, and
/// every review comes from the API server, so the server's per-source bound does not tell
/// tenants apart: without this, a tenant naming a registry that answers slowly (one it runs
/// itself, where `unmatched: pin` lets images come from anywhere) could hold every slot the
/// API server has. More are denied at once, with the reason; warm reviews never wait.
pub const MAX_WAITING_REVIEWS_PER_NAMESPACE: usize = 8;

/// Largest signature payload (cosign's simple-signing JSON) read: the payload is a few hundred
/// bytes plus the signer's optional annotations.
pub const MAX_SIGNATURE_PAYLOAD_BYTES: usize = 64 * KIB;

/// Largest token endpoint answer read: a JSON object with one or two tokens of at most
/// [`MAX_TOKEN_BYTES`] each (`token` and `access_token`) and a few small fields.
pub const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * KIB;

/// Longest bearer token used: real ones are JWTs of 1–4 KiB (Docker Hub's, GHCR's). A longer
/// one is a refusal, not kept: a tenant's token service could otherwise make every token it
/// hands out 256 KiB and moat keep a thousand of them.
pub const MAX_TOKEN_BYTES: usize = 16 * KIB;

/// Longest `WWW-Authenticate` challenge read (realm, service and scope): a few hundred bytes
/// in practice.
pub const MAX_CHALLENGE_BYTES: usize = 4 * KIB;

/// Largest response head (status line and headers) read from a registry, which is also the
/// client's read buffer (hyper's `max_buf_size`; its default is 400 KiB). Real heads are a
/// KiB or two.
pub const MAX_RESPONSE_HEAD_BYTES: usize = 64 * KIB;

/// Signatures looked at per image: each is a blob fetched and a verification per key. Images
/// are signed once per release key, rarely more than a handful of times; more is someone
/// filling the tag to slow moat down.
pub const MAX_SIGNATURES_PER_IMAGE: usize = 16;

/// Redirects followed for one blob (registries on object storage redirect once).
pub const MAX_REDIRECTS: usize = 3;

/// Largest credentials file read (`.dockerconfigjson` of a Secret, itself at most 1 MiB).
pub const MAX_CREDENTIALS_FILE_BYTES: u64 = MIB as u64;

/// Entries the cache keeps (tag → digest and digest → verdict together). A review of a pod
/// names a handful of images; a cluster runs a few thousand distinct ones.
pub const MAX_CACHE_ENTRIES: usize = 16 * 1024;

/// Bytes the cache's entries may hold together, counted as key and value lengths plus
/// [`CACHE_ENTRY_OVERHEAD_BYTES`] each: the memory `moat install` accounts for it.
pub const MAX_CACHE_BYTES: usize = 8 * MIB;

/// What one cache entry costs beyond its key and value: the map slot, the eviction queue
/// slot and the expiry.
pub const CACHE_ENTRY_OVERHEAD_BYTES: usize = 128;

/// The share of the cache's entries and bytes one namespace's lookups may fill: an eighth.
/// A namespace at its share replaces its own oldest entries, not other namespaces' (which,
/// evicted oldest first, one tenant could otherwise flush in a fraction of a second).
pub const CACHE_SHARE_DIVISOR: usize = 8;

/// How long a lookup that failed (the tag does not exist, the registry is unreachable or
/// answered something unusable) is answered from the cache: long enough that one namespace
/// repeating thousands of lookups of a missing tag makes one call, short enough that a tag
/// just pushed is seen on the next retry. Refused credentials are not kept (a credentials
/// reload fixes them at once).
pub const FAILURE_TTL: Duration = Duration::from_secs(5);

/// What one connection to a registry holds beyond its read buffer: rustls' buffers (a
/// received record of up to 16 KiB being reassembled, records sent) and hyper's write buffer.
pub const CONNECTION_STATE_BYTES: usize = 64 * KIB;

/// What one call in flight may hold: its body while read (twice: the chunks, then the one
/// contiguous copy that is hashed and parsed), its read buffer ([`MAX_RESPONSE_HEAD_BYTES`])
/// and its connection. A token answer ([`MAX_TOKEN_RESPONSE_BYTES`]) is read within the same
/// call, after the first answer's body was dropped.
pub const CALL_BYTES: usize =
    2 * MAX_MANIFEST_BYTES + MAX_RESPONSE_HEAD_BYTES + CONNECTION_STATE_BYTES;

/// What one lookup waiting for its turn holds: its future's state (the review's futures nest
/// a few KiB deep), its cache keys and reference, and a failure's message.
pub const LOOKUP_BYTES: usize = 8 * KIB;

/// Registries whose idle connections the memory limit accounts for: [`Repo`] keeps idle
/// connections only to registries a rule names, which the operator writes; more than this
/// many of them makes the limit short by their idle connections.
///
/// [`Repo`]: crate::client
pub const POOLED_REGISTRIES_ACCOUNTED: usize = 16;

/// Bytes the token store may hold (values, keys and [`TOKEN_ENTRY_OVERHEAD_BYTES`] each).
pub const MAX_TOKEN_STORE_BYTES: usize = MIB;

/// What one token store entry costs beyond its key and value.
pub const TOKEN_ENTRY_OVERHEAD_BYTES: usize = 128;

/// What the registry client may hold at once, for the memory limit, whatever registries send:
///
/// | what | bound |
/// |---|---|
/// | cache | [`MAX_CACHE_BYTES`] |
/// | tokens | [`MAX_TOKEN_STORE_BYTES`] |
/// | calls in flight | [`MAX_CALLS_IN_FLIGHT`] × [`CALL_BYTES`] |
/// | lookups waiting | [`MAX_WAITING_LOOKUPS`] × [`LOOKUP_BYTES`] |
/// | idle connections | [`POOLED_REGISTRIES_ACCOUNTED`] × [`MAX_IDLE_CONNECTIONS_PER_HOST`] × ([`MAX_RESPONSE_HEAD_BYTES`] + [`CONNECTION_STATE_BYTES`]) |
pub const MAX_HELD_BYTES: usize = MAX_CACHE_BYTES
    + MAX_TOKEN_STORE_BYTES
    + MAX_CALLS_IN_FLIGHT * CALL_BYTES
    + MAX_WAITING_LOOKUPS * LOOKUP_BYTES
    + POOLED_REGISTRIES_ACCOUNTED
        * MAX_IDLE_CONNECTIONS_PER_HOST
        * (MAX_RESPONSE_HEAD_BYTES + CONNECTION_STATE_BYTES);

/// How long a verified signature is reused for the same digest, repository and keys. A
/// signature over a digest never stops being valid; what can change is the registry deleting
/// it (revocation), which moat sees this late at most.
pub const VERIFIED_TTL: Duration = Duration::from_secs(600);

/// Bearer tokens and per-registry authorisation headers kept at once (and at most
/// [`MAX_TOKEN_STORE_BYTES`]); at a bound, those that expire first go (each costs one token
/// request to get back).
pub const MAX_TOKENS: usize = 1024;

/// Longest a bearer token is reused, whatever its `expires_in` says.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(300);

/// A token is dropped this long before it expires, so it is not sent as it lapses.
pub const TOKEN_EXPIRY_MARGIN: Duration = Duration::from_secs(10);

/// Idle connections kept per registry host, for the next cold lookup to skip the handshake:
/// only for registries a rule names (the operator bounds them); connections to the others,
/// which tenants name, close after each call.
pub const MAX_IDLE_CONNECTIONS_PER_HOST: usize = 4;

/// How long an idle registry connection is kept.
pub const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

// Every bound's parts fit together: checked when the crate compiles.
const _: () = assert!(MAX_TOKEN_BYTES * 2 < MAX_TOKEN_RESPONSE_BYTES);
const _: () = assert!(MAX_TOKEN_BYTES + TOKEN_ENTRY_OVERHEAD_BYTES < MAX_TOKEN_STORE_BYTES);
const _: () = assert!(MAX_WAITING_LOOKUPS_PER_NAMESPACE < MAX_WAITING_LOOKUPS);
const _: () = assert!(MAX_CALLS_PER_REGISTRY_PER_NAMESPACE < MAX_CALLS_IN_FLIGHT_PER_REGISTRY);
// hyper refuses a read buffer under 8 KiB (it panics).
const _: () = assert!(MAX_RESPONSE_HEAD_BYTES >= 8 * KIB);
