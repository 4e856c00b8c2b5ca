// Who this tab is signed in as, for both pages. The token lives in sessionStorage (this tab
// only) under `key`. A link of the form /#token=sp_... offers to sign the tab in: the fragment
// never reaches a server, and the page never switches by itself (whoever made the link could
// be anyone): it says whose account the link is for, and whose it would replace, and waits.
function pageSession(key, onSignIn) {
  const input = document.getElementById('token');
  const token = () => sessionStorage.getItem(key) || '';
  const message = (text) => { document.getElementById('message').textContent = text || ''; };

  async function api(path, options = {}, bearer = token()) {
    // A file upload (FormData) sets its own multipart Content-Type.
    const json = !(options.body instanceof FormData);
    const headers = {...(json ? {'Content-Type': 'application/json'} : {}), ...(options.headers || {})};
    if (bearer) headers['Authorization'] = 'Bearer ' + bearer;
    const response = await fetch(path, {...options, headers});
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error((body.error && body.error.message) || response.statusText);
    return body;
  }

  async function showWho() {
    const who = document.getElementById('who');
    if (!token()) { who.textContent = 'Not signed in.'; return; }
    try { const me = await api('/api/me'); who.textContent = `Signed in as ${me.email} (${me.role}).`; }
    catch (err) { who.textContent = 'The token was not accepted: ' + err.message; }
  }

  function use(value) {
    if (value) sessionStorage.setItem(key, value); else sessionStorage.removeItem(key);
    input.value = value;
    showWho();
    onSignIn();
  }

  async function offerLinkSignIn() {
    const offered = new URLSearchParams(location.hash.slice(1)).get('token');
    if (!offered) return;
    history.replaceState(null, '', location.pathname);
    if (offered === token()) return;
    let them;
    try { them = await api('/api/me', {}, offered); } catch (err) { message('The sign-in link is not valid: ' + err.message); return; }
    let text = `This link signs this tab in as ${them.email} (${them.role}).`;
    if (token()) {
      try { const me = await api('/api/me'); text += ` You are signed in as ${me.email}: switch accounts?`; } catch (err) { /* the old token no longer works */ }
    }
    const box = document.getElementById('link-signin');
    document.getElementById('link-signin-text').textContent = text;
    box.hidden = false;
    document.getElementById('link-signin-accept').onclick = () => { box.hidden = true; use(offered); };
    document.getElementById('link-signin-ignore').onclick = () => { box.hidden = true; };
  }

  document.getElementById('save-token').onclick = () => use(input.value.trim());
  const forget = document.getElementById('forget-token');
  if (forget) forget.onclick = () => use('');
  input.value = token();
  window.addEventListener('hashchange', offerLinkSignIn);
  offerLinkSignIn();
  showWho();
  return {token, api, message};
}
