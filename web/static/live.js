// The live stream for a page: GET /api/events through a one-use ticket (an EventSource cannot
// send the Authorization header, and the token itself never goes into a URL). On every change
// onChange() runs; while the stream is down the page polls instead, and says which it is doing.
function liveStream({token, onChange, status, pollMs = 5000}) {
  let source = null;
  let lastId = '';
  let live = false;
  const show = (text, isLive) => { live = isLive; if (status) { status.textContent = text; status.dataset.live = isLive ? 'yes' : 'no'; } };

  async function connect() {
    if (source) { source.close(); source = null; }
    if (!token()) { show('Not live: sign in first.', false); return; }
    try {
      const response = await fetch('/api/stream-tickets', {method: 'POST', headers: {'Authorization': 'Bearer ' + token()}});
      if (!response.ok) throw new Error(response.statusText);
      const ticket = await response.json();
      const url = new URL(ticket.url, location.href);
      url.searchParams.set('ticket', ticket.ticket);
      if (lastId) url.searchParams.set('last_event_id', lastId);
      source = new EventSource(url);
    } catch (err) { show('Not live (refreshing every few seconds).', false); setTimeout(connect, 5000); return; }
    source.onopen = () => { show('Live', true); onChange(); };
    source.addEventListener('enrollment.updated', (event) => { lastId = event.lastEventId; onChange(JSON.parse(event.data)); });
    source.onerror = () => {
      // The ticket was used up by this connection: a reconnect needs a new one.
      show('Not live (reconnecting; refreshing every few seconds).', false);
      source.close(); source = null;
      setTimeout(connect, 2000);
    };
  }
  setInterval(() => { if (!live) onChange(); }, pollMs);
  connect();
  return {reconnect: connect, isLive: () => live};
}
