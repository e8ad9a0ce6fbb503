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

/// Largest token endpoint answer read: a JSON object with one or two JWTs of a few KiB each.
pub const MAX_TOKEN_RESPONSE_BYTES: usize = 256 * KIB;

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

/// What the registry client may hold at once, for the memory limit: the cache and every call's
/// body in flight.
pub const MAX_HELD_BYTES: usize = MAX_CACHE_BYTES + MAX_CALLS_IN_FLIGHT * MAX_MANIFEST_BYTES;

/// How long a verified signature is reused for the same digest, repository and keys. A
/// signature over a digest never stops being valid; what can change is the registry deleting
/// it (revocation), which moat sees this late at most.
pub const VERIFIED_TTL: Duration = Duration::from_secs(600);

/// Bearer tokens and per-registry authorisation headers kept at once; at the cap all are
/// dropped (each costs one token request to get back).
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
