//! The mailbox (`kade mailbox serve`): an HTTPS relay that holds ciphertext chunks and routing
//! metadata between hospital nodes, and nothing else.
//!
//! Every request arrives over mutual TLS: the listener only completes a handshake with a client
//! certificate issued by the mailbox's CA, and hands the certificate to the handlers as a
//! [`PeerCertificate`] request extension. The caller's organisation is the certificate
//! subject's Organisation (O); a bundle is accepted only when its signed header names that
//! organisation as the sender, and is handed out only to its recipient.
//!
//! # API (JSON unless noted; errors are `{"error": "…"}`)
//! | method and path | who | what |
//! |---|---|---|
//! | `GET /v1/directory` | any node | the signed peer directory |
//! | `POST /v1/bundles` | sender | create a bundle from its signed header; 409 for a known bundle id (replay) |
//! | `GET /v1/bundles/{id}` | sender, recipient | state, header and the chunk indexes held |
//! | `PUT /v1/bundles/{id}/chunks/{i}` | sender | one ciphertext chunk (`application/octet-stream`); the same bytes again succeed, different bytes are 409 |
//! | `POST /v1/bundles/{id}/seal` | sender | seal once every chunk is present (409 lists the missing ones); only then does the recipient see it |
//! | `DELETE /v1/bundles/{id}` | sender | recall a bundle not yet fetched: ciphertext deleted, the recipient gets 410 |
//! | `GET /v1/inbox[?wait=SECS&seen=G]` | recipient | sealed bundles waiting; with `wait` and `seen`, held open (up to 60 s) until a bundle is sealed after generation `G` (header `kade-inbox-generation`) |
//! | `GET /v1/bundles/{id}/chunks/{i}` | recipient | one ciphertext chunk of a sealed bundle |
//! | `POST /v1/bundles/{id}/receipt` | recipient | the sealed, signed receipt (octet-stream) |
//! | `GET /v1/outbox` | sender | the sender's bundles, states and sealed receipts |
//!
//! # What it stores
//! Rows in `mailbox_bundles` / `mailbox_chunks` (ids, organisation ids, sizes, counts, times,
//! states, the signed header whose manifest and key are encrypted) and chunk ciphertext in the
//! blob store under `exchange/{bundle_id}/`. Its audit entries name organisations and bundle
//! ids only; it never sees a patient name, a national id or a DICOM UID.
//!
//! # Lifecycle
//! `uploading` → `sealed` → `fetched` (first chunk downloaded) → `acknowledged` (receipt);
//! `recalled` by the sender before the fetch; `expired` at the header's `expires_at` when not
//! acknowledged; acknowledged bundles are `purged` after the configured retention. Leaving
//! `uploading`/`sealed`/`fetched` for any end state deletes the ciphertext; the row stays, so a
//! bundle id is never accepted twice.

mod server;

pub(crate) use server::unix_now;
pub use server::{
    INBOX_GENERATION_HEADER, MAX_INBOX_WAIT_SECS, Mailbox, MailboxOptions, PeerCertificate,
    organisation_of, router,
};
