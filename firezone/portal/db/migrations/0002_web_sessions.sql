-- Browser sessions of the portal's admin pages and sign-ins in progress.
-- Only hashes of cookie secrets and one-time codes are stored.
CREATE TABLE web_sessions (
  id TEXT PRIMARY KEY,
  account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
  actor_id TEXT NOT NULL REFERENCES actors (id) ON DELETE CASCADE,
  provider_id TEXT REFERENCES providers (id) ON DELETE CASCADE,
  secret_hash TEXT NOT NULL,
  remote_ip TEXT,
  user_agent TEXT,
  created_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL,
  revoked_at INTEGER
);
CREATE INDEX web_sessions_actor ON web_sessions (actor_id);

-- One sign-in in progress in one browser (email code or OIDC), found through a cookie.
-- data (JSON): what the client asked for (as, state, nonce) and, for OIDC, state/verifier/nonce.
CREATE TABLE sign_in_flows (
  id TEXT PRIMARY KEY,
  account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
  provider_id TEXT NOT NULL REFERENCES providers (id) ON DELETE CASCADE,
  secret_hash TEXT NOT NULL,
  email TEXT,
  code_hash TEXT,
  attempts INTEGER NOT NULL DEFAULT 0,
  data TEXT NOT NULL DEFAULT '{}',
  created_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL,
  used_at INTEGER
);
CREATE INDEX sign_in_flows_email ON sign_in_flows (account_id, email, created_at);
