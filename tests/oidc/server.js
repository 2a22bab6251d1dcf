// A real OpenID Provider for the sign-in tests, on loopback only.
//
//   node server.js '<json config>'
//   config: {"port": 0, "clients": [{"client_id", "client_secret", "redirect_uris": [...]}]}
//
// Prints one line "READY <issuer>" on stdout once listening. Logins use oidc-provider's
// development interactions: any login name is accepted and becomes the subject; when it looks
// like an email address it is also the (verified) email claim. Consent is granted automatically.
import Provider from 'oidc-provider';

const cfg = JSON.parse(process.argv[2] || '{}');
const host = '127.0.0.1';

const configuration = {
  clients: (cfg.clients || []).map((c) => ({
    client_id: c.client_id,
    client_secret: c.client_secret,
    redirect_uris: c.redirect_uris,
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  })),
  claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name'] },
  conformIdTokenClaims: false,
  pkce: { required: () => true },
  cookies: { keys: ['fz-test-cookie-key-not-secret'] },
  features: { devInteractions: { enabled: true } },
  ttl: { Session: 600, Interaction: 600, Grant: 600, AuthorizationCode: 60, IdToken: 300, AccessToken: 300 },
  async findAccount(ctx, id) {
    return {
      accountId: id,
      async claims() {
        const claims = { sub: id, name: id.split('@')[0] };
        if (id.includes('@')) { claims.email = id.toLowerCase(); claims.email_verified = true; }
        return claims;
      },
    };
  },
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId
      || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    // first-party test client: consent is implied
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope('openid email profile');
    await grant.save();
    return grant;
  },
};

// The port must be known before the issuer is fixed: listen first, then mount the provider.
import http from 'node:http';

let handler = (req, res) => { res.statusCode = 503; res.end(); };
const server = http.createServer((req, res) => handler(req, res));
server.listen(cfg.port || 0, host, () => {
  const issuer = `http://${host}:${server.address().port}`;
  const oidc = new Provider(issuer, configuration);
  oidc.on('server_error', (ctx, err) => console.error('server_error', err));
  handler = oidc.callback();
  console.log(`READY ${issuer}`);
});

for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => server.close(() => process.exit(0)));
