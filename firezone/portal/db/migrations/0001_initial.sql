-- Portable SQL: TEXT ids, INTEGER millisecond times, JSON as TEXT.
CREATE TABLE accounts (
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  slug TEXT NOT NULL UNIQUE,
  disabled INTEGER NOT NULL DEFAULT 0,
  settings TEXT NOT NULL DEFAULT '{}',
  created_at INTEGER NOT NULL
);

CREATE TABLE actors (
  id TEXT PRIMARY KEY,
  account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
  type TEXT NOT NULL CHECK (type IN ('user', 'admin', 'service_account')),
  email TEXT,
  name TEXT NOT NULL,
  disabled INTEGER NOT NULL DEFAULT 0,
  created_at INTEGER NOT NULL,
  UNIQUE (account_id, email)
);

CREATE TABLE groups (
  id TEXT PRIMARY KEY,
  account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
  name TEXT NOT NULL,
  managed INTEGER NOT NULL DEFAULT 0,
  created_at INTEGER NOT NULL,
  UNIQUE (account_id, name)
);

CREATE TABLE memberships (
  account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
  group_id TEXT NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
  actor_id TEXT NOT NULL REFERENCES actors (id) ON DELETE CASCADE,
  created_at INTEGER NOT NULL,
  PRIMARY KEY (group_id, actor_id)
);
CREATE INDEX memberships_actor ON memberships (actor_id);

CREATE TABLE sites (
  id TEXT PRIMARY KEY,
  account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
  name TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  UNIQUE (account_id, name)
);

CREATE TABLE resources (
  id TEXT PRIMARY KEY,
  account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
  site_id TEXT NOT NULL REFERENCES sites (id) ON DELETE RESTRICT,
  name TEXT NOT NULL,
  type TEXT NOT NULL CHECK (type IN ('ip', 'cidr', 'dns', 'internet')),
  address TEXT,
  address_description TEXT,
  filters TEXT NOT NULL DEFAULT '[]',
  created_at INTEGER NOT NULL,
  updated_at INTEGER NOT NULL,
  UNIQUE (account_id, name)
);
CREATE INDEX resources_site ON resources (site_id);

CREATE TABLE policies (
  id TEXT PRIMARY KEY,
  account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
  group_id TEXT NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
  resource_id TEXT NOT NULL REFERENCES resources (id) ON DELETE CASCADE,
  description TEXT,
  conditions TEXT NOT NULL DEFAULT '[]',
  disabled INTEGER NOT NULL DEFAULT 0,
  created_at INTEGER NOT NULL
);
CREATE INDEX policies_resource_group ON policies (resource_id, group_id);
CREATE INDEX policies_group ON policies (group_id);

CREATE TABLE providers (
  id TEXT PRIMARY KEY,
  account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
  type TEXT NOT NULL CHECK (type IN ('email', 'oidc')),
  name TEXT NOT NULL,
  config TEXT NOT NULL DEFAULT '{}',
  disabled INTEGER NOT NULL DEFAULT 0,
  created_at INTEGER NOT NULL,
  UNIQUE (account_id, name)
);

CREATE TABLE tokens (
  id TEXT PRIMARY KEY,
  account_id TEXT REFERENCES accounts (id) ON DELETE CASCADE,
  type TEXT NOT NULL CHECK (type IN ('api', 'client', 'gateway', 'relay')),
  name TEXT,
  actor_id TEXT REFERENCES actors (id) ON DELETE CASCADE,
  site_id TEXT REFERENCES sites (id) ON DELETE CASCADE,
  provider_id TEXT REFERENCES providers (id) ON DELETE SET NULL,
  secret_salt TEXT NOT NULL,
  secret_hash TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  expires_at INTEGER,
  revoked_at INTEGER,
  last_used_at INTEGER
);
CREATE INDEX tokens_actor ON tokens (actor_id);

CREATE TABLE devices (
  id TEXT PRIMARY KEY,
  account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
  type TEXT NOT NULL CHECK (type IN ('client', 'gateway')),
  external_id TEXT NOT NULL,
  name TEXT NOT NULL,
  actor_id TEXT REFERENCES actors (id) ON DELETE CASCADE,
  site_id TEXT REFERENCES sites (id) ON DELETE CASCADE,
  public_key TEXT,
  ipv4 TEXT NOT NULL,
  ipv6 TEXT NOT NULL,
  verified_at INTEGER,
  created_at INTEGER NOT NULL,
  last_seen_at INTEGER,
  last_seen_remote_ip TEXT,
  last_seen_version TEXT,
  UNIQUE (account_id, ipv4),
  UNIQUE (account_id, ipv6),
  UNIQUE (account_id, type, external_id)
);

CREATE TABLE decisions (
  id TEXT PRIMARY KEY,
  account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
  at INTEGER NOT NULL,
  result TEXT NOT NULL CHECK (result IN ('allow', 'deny')),
  reason TEXT NOT NULL,
  actor_id TEXT,
  actor_email TEXT,
  device_id TEXT,
  resource_id TEXT,
  resource_name TEXT,
  gateway_id TEXT,
  policy_id TEXT,
  violated_properties TEXT NOT NULL DEFAULT '[]',
  remote_ip TEXT
);
CREATE INDEX decisions_account_at ON decisions (account_id, at);
