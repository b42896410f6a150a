"""Outbound mail authentication: DKIM signatures for the mail we send, ARC seals for the mail we
forward (the intake role's signing step; the inbound checks live in `mailhaven.checks`).

Modules, each with one job:
* `canon`: RFC 6376 relaxed canonicalization of header fields and bodies (chunked body hash);
* `keys`: the key store `<key_dir>/<domain>/<selector>.key`, key generation, the DNS TXT record;
* `signer`: `DKIM-Signature:` fields (RSA-SHA256, Ed25519-SHA256; RFC 6376, RFC 8463);
* `arc`: an ARC set (RFC 8617) on top of a forwarded message;
* `outbound`: the hook intake calls before the commit: which message gets what.

Everything but `outbound` is pure (bytes and keys in, header fields out; time is a parameter).
Sender rewriting (SRS) belongs to routing and lives in `mailhaven.routing.srs`. May import
routing, config, spool, net, runtime (the signing job thread) and proto; intake, below it, calls
its hook as an injected callable.

Trust: the private keys are secrets (mode 0600, refused when others can read them); the
message is hostile input, but signing only hashes it -- no field of it decides which key signs
except the From: domain, and only among our own domains' keys.
"""
