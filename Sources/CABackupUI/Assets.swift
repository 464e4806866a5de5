import HTTPTypes
import Hummingbird
import NIOCore

/// The page, its script and its style, shipped in the binary: no CDN, no build step, works
/// offline. The script is served as `/app.js` (the Content-Security-Policy allows no inline
/// script), and talks to the JSON API with the `X-CABackup-UI: 1` header on every change.
enum Assets {
    static func response(_ text: String, type: String, status: Int = 200) -> Response {
        Response(
            status: HTTPResponse.Status(code: status), headers: [.contentType: type],
            body: ResponseBody(byteBuffer: ByteBuffer(string: text)))
    }

    static let page = """
        <!DOCTYPE html>
        <html lang="en">
        <head>
        <meta charset="utf-8">
        <meta name="viewport" content="width=device-width, initial-scale=1">
        <title>cabackup</title>
        <link rel="stylesheet" href="/app.css">
        <script src="/app.js" defer></script>
        </head>
        <body>
        <header><h1>cabackup</h1><p id="message" role="status" aria-live="polite"></p></header>
        <main>
        <section id="repositories" aria-labelledby="repositories-title">
        <h2 id="repositories-title">Repositories</h2>
        <ul id="repository-list"></ul>
        <details id="add">
        <summary>Add a repository</summary>
        <form id="add-form">
        <label>Name <input name="name" required pattern="[A-Za-z0-9._-]{1,64}"></label>
        <label>Location <input name="repo" required placeholder="/backups/home, http://NAME@HOST:PORT or s3:…"></label>
        <label>Paths to back up (one per line) <textarea name="paths" required rows="2"></textarea></label>
        <label>Check every <input name="every" placeholder="1h"></label>
        <label>Exclude (one pattern per line) <textarea name="exclude" rows="2"></textarea></label>
        <label><input type="checkbox" name="init"> Create a new repository there</label>
        <label>Password <input type="password" name="password" autocomplete="new-password"></label>
        <button type="submit">Add</button>
        </form>
        </details>
        <details id="account">
        <summary>Log in to a server space</summary>
        <form id="account-form">
        <label>Server <input name="server" required placeholder="https://backup.example.org:8443"></label>
        <label>Account name <input name="user" required pattern="[a-z0-9._-]{1,64}" autocomplete="username"></label>
        <label><input type="checkbox" name="register"> Register a new account</label>
        <label>E-mail (to register) <input type="email" name="email" autocomplete="email"></label>
        <label>Account password <input type="password" name="password" required autocomplete="current-password"></label>
        <button type="submit">Log in</button>
        </form>
        </details>
        <details id="s3">
        <summary>Set up an S3 bucket</summary>
        <form id="s3-form">
        <label>Endpoint <input name="endpoint" required placeholder="https://s3.eu-central-1.amazonaws.com"></label>
        <label>Bucket <input name="bucket" required pattern="[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"></label>
        <label>Prefix in the bucket (optional) <input name="prefix" placeholder="laptop"></label>
        <label>Region <input name="region" placeholder="us-east-1"></label>
        <label>Access key id <input name="accessKeyId" required autocomplete="off"></label>
        <label>Secret access key <input type="password" name="secretAccessKey" required autocomplete="off"></label>
        <button type="submit">Save the keys</button>
        </form>
        </details>
        </section>
        <section id="repository" hidden aria-labelledby="repository-title">
        <h2 id="repository-title" tabindex="-1"></h2>
        <div id="banner" role="alert" hidden><p id="banner-text"></p><button id="banner-sync" type="button">Sync now</button>
        <button id="notify" type="button" hidden>Notify me when this tab is hidden</button></div>
        <form id="unlock-form">
        <label>Password <input type="password" name="password" autocomplete="current-password"></label>
        <button type="submit">Unlock</button>
        </form>
        <button id="lock" type="button">Lock</button>
        <div id="space-view" hidden>
        <h3>Storage</h3>
        <svg id="usage-chart" role="img" aria-labelledby="usage-text" viewBox="0 0 100 6" preserveAspectRatio="none"><rect class="free" x="0" y="0" width="100" height="6"></rect><rect id="usage-used" class="used" x="0" y="0" width="0" height="6"></rect></svg>
        <p id="usage-text"></p>
        <h3>Devices</h3>
        <table id="devices"><thead><tr><th>Device</th><th>Rights</th><th class="wide">Last seen</th><th>Revoke</th></tr></thead><tbody></tbody></table>
        </div>
        <div id="unlocked-view">
        <h3>What changed since the last sync</h3>
        <p id="changes-summary"></p>
        <ul id="changes"></ul>
        <button id="check" type="button">Check now</button>
        <button id="sync" type="button">Sync now</button>
        <progress id="job-progress" max="1" value="0" hidden></progress>
        <p id="job-status" role="status"></p>
        <h3>Snapshots</h3>
        <ol id="snapshots" reversed></ol>
        <h3>Browse</h3>
        <p id="tree-path" tabindex="-1"></p>
        <label>Restore into (an empty or new folder) <input id="restore-target" placeholder="/tmp/restore"></label>
        <table id="tree"><thead><tr><th>Name</th><th>Size</th><th class="wide">Modified</th><th>Get</th><th>Restore</th></tr></thead><tbody></tbody></table>
        <form id="find-form"><label>Find <input name="pattern" placeholder="*.jpg"></label><button type="submit">Search</button></form>
        <ul id="found"></ul>
        </div>
        </section>
        </main>
        </body>
        </html>

        """

    /// What `/login` answers with the session cookie: a same-site step on to the page.
    static let loggedIn = """
        <!DOCTYPE html>
        <html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="0;url=/">
        <title>cabackup</title></head>
        <body><p>Logged in. <a href="/">Open cabackup</a>.</p></body></html>

        """

    static let style = """
        * { box-sizing: border-box; }
        body { font: 16px/1.4 system-ui, sans-serif; margin: 0 auto; max-width: 60rem; padding: 0 1rem; color: #222;
          overflow-wrap: anywhere; }
        :focus-visible { outline: 3px solid #1a5fb4; outline-offset: 2px; }
        h2[tabindex]:focus, p[tabindex]:focus { outline: none; }
        #banner { background: #fff4ce; border: 1px solid #c9a200; padding: .4rem .8rem; margin: .6rem 0; }
        #banner p { margin: .2rem 0; font-weight: 600; }
        a { color: #1a5fb4; padding: .2rem 0; display: inline-block; margin-right: .6rem; }
        h1 { font-size: 1.4rem; }
        label { display: block; margin: .4rem 0; }
        input, textarea { width: 100%; font: inherit; padding: .3rem; }
        input[type=checkbox] { width: auto; }
        button { font: inherit; padding: .3rem .8rem; margin: .2rem 0; max-width: 100%; overflow-wrap: break-word; }
        #repository-list button, #snapshots button { width: 100%; text-align: left; }
        table { border-collapse: collapse; width: 100%; table-layout: fixed; }
        th:nth-child(2) { width: 5.5rem; } th:nth-child(3) { width: 11rem; }
        th:nth-child(4) { width: 5.5rem; } th:nth-child(5) { width: 6rem; }
        td:nth-child(4) a, td:nth-child(5) button { overflow-wrap: normal; }
        td, th { text-align: left; padding: .2rem .4rem; border-bottom: 1px solid #ddd; overflow-wrap: anywhere; }
        progress { width: 100%; }
        #usage-chart { width: 100%; height: 1.2rem; display: block; border: 1px solid #888; }
        #usage-chart .free { fill: #e6e6e6; } #usage-chart .used { fill: #1a5fb4; } #usage-chart.full .used { fill: #c01c28; }
        #devices th:nth-child(1) { width: auto; } #devices th:nth-child(2) { width: 7rem; }
        #devices th:nth-child(3) { width: 11rem; } #devices th:nth-child(4) { width: 6rem; }
        #message { color: #a00; min-height: 1.4em; }
        ul, ol { padding-left: 1.2rem; overflow-wrap: anywhere; }
        @media (max-width: 40rem) {
          body { padding: 0 .5rem; }
          .wide { display: none; }
          th:nth-child(2) { width: 4.5rem; }
          td, th { padding: .2rem; }
        }

        """

    static let script = """
        "use strict";
        const state = { repositories: [], current: null, snapshot: null, path: "/", checkedAt: "", notified: "" };

        async function api(method, path, body) {
          const init = { method, headers: { "X-CABackup-UI": "1" }, credentials: "same-origin" };
          if (body !== undefined) { init.body = JSON.stringify(body); init.headers["Content-Type"] = "application/json"; }
          const response = await fetch(path, init);
          if (response.status === 204) return null;
          const data = await response.json();
          if (!response.ok) throw new Error(data.error || response.statusText);
          return data;
        }

        function say(text) { document.getElementById("message").textContent = text || ""; }
        function el(tag, text) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; return e; }
        function bytes(n) {
          const units = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
          while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
          return (i ? n.toFixed(1) : n) + " " + units[i];
        }
        function repoPath(rest) { return "/api/repositories/" + encodeURIComponent(state.current.name) + rest; }

        async function loadRepositories() {
          state.repositories = await api("GET", "/api/repositories");
          const list = document.getElementById("repository-list");
          list.replaceChildren();
          for (const r of state.repositories) {
            const item = el("li"); const button = el("button", r.name + " — " + r.repo + (r.unlocked ? "" : " (locked)"));
            button.type = "button"; button.addEventListener("click", () => select(r.name));
            item.append(button); list.append(item);
          }
          if (state.current) state.current = state.repositories.find(r => r.name === state.current.name) || null;
        }

        async function select(name) {
          say("");
          state.current = state.repositories.find(r => r.name === name);
          state.snapshot = null; state.path = "/";
          document.getElementById("repository").hidden = false;
          document.getElementById("repository-title").textContent = name;
          const unlocked = state.current.unlocked;
          document.getElementById("unlock-form").hidden = unlocked;
          document.getElementById("lock").hidden = !unlocked;
          document.getElementById("unlocked-view").hidden = !unlocked;
          document.getElementById("banner").hidden = true; state.checkedAt = "";
          const space = state.current.repo.startsWith("http://") || state.current.repo.startsWith("https://");
          document.getElementById("space-view").hidden = !space;
          if (space) await loadSpace().catch(e => say(e.message));
          if (unlocked) { await Promise.all([checkChanges(), loadSnapshots()]); }
          if (unlocked) document.getElementById("repository-title").focus();
          else document.querySelector("#unlock-form input[name=password]").focus();
        }

        // A server space: its storage against the quota, and its devices with Revoke.
        async function loadSpace() {
          const [usage, devices] = await Promise.all([api("GET", repoPath("/usage")), api("GET", repoPath("/devices"))]);
          const share = usage.quota ? Math.min(1, usage.used / usage.quota) : 0;
          document.getElementById("usage-used").setAttribute("width", String(share * 100));
          document.getElementById("usage-chart").classList.toggle("full", share >= 0.9);
          document.getElementById("usage-text").textContent = usage.quota
            ? bytes(usage.used) + " of " + bytes(usage.quota) + " used (" + (share * 100).toFixed(1) + "%)"
            : bytes(usage.used) + " used (no quota)";
          const body = document.querySelector("#devices tbody"); body.replaceChildren();
          for (const d of devices) {
            const row = el("tr"); const revoke = el("button", "Revoke"); revoke.type = "button";
            revoke.setAttribute("aria-label", "Revoke " + d.device);
            revoke.addEventListener("click", guard(async () => {
              const what = d.current ? "this device's own login (the page will no longer reach the space)" : "the device " + d.device;
              if (!window.confirm("Revoke " + what + "? It must log in again with the account password.")) return;
              await api("DELETE", repoPath("/devices/" + encodeURIComponent(d.id)));
              say("Revoked " + d.device + "."); await loadSpace();
            }));
            const cell = el("td"); cell.append(revoke);
            const seen = el("td", d.lastUsed.slice(0, 19).replace("T", " ")); seen.className = "wide";
            row.append(el("td", d.device + (d.current ? " (this device)" : "")), el("td", d.rights), seen, cell);
            body.append(row);
          }
        }

        async function checkChanges() { showChanges(await api("GET", repoPath("/changes"))); }

        // A change set, from Check now or the schedule (the newest wins): the summary, the
        // list, and the banner when there is something to back up; a browser notification
        // too when the tab is hidden (once per change set).
        function showChanges(c) {
          if (!c || c.checkedAt < state.checkedAt) return;
          state.checkedAt = c.checkedAt;
          const counts = c.added + " added, " + c.removed + " removed, " + c.modified + " modified; " + c.filesToSync +
            " files (" + bytes(c.bytesToSync) + ") to sync";
          const changed = c.added + c.removed + c.modified + c.metadataOnly > 0;
          document.getElementById("banner").hidden = !changed;
          const prompt = "Changes to back up in " + state.current.name + ": " + counts + ".";
          const bannerText = document.getElementById("banner-text");
          if (bannerText.textContent !== prompt) bannerText.textContent = prompt;
          const canNotify = "Notification" in window && Notification.permission === "default";
          document.getElementById("notify").hidden = !canNotify;
          const key = state.current.name + " " + c.base + " " + counts + " " + c.entries.map(e => e.change + e.path + e.size).join(",");
          if (changed && key !== state.notified && document.hidden && "Notification" in window && Notification.permission === "granted") {
            new Notification("cabackup: changes to back up", { body: state.current.name + ": " + counts });
          }
          if (changed) state.notified = key;
          document.getElementById("changes-summary").textContent =
            counts + " — checked " + c.checkedAt.slice(0, 19).replace("T", " ");
          const list = document.getElementById("changes"); list.replaceChildren();
          for (const e of c.entries.slice(0, 50)) list.append(el("li", e.change + " " + e.path));
        }

        async function loadSnapshots() {
          const snapshots = await api("GET", repoPath("/snapshots"));
          const list = document.getElementById("snapshots"); list.replaceChildren();
          for (const s of snapshots.slice().reverse()) {
            const item = el("li"); const button = el("button",
              s.time.slice(0, 19).replace("T", " ") + " " + s.shortId + " — " + s.filesNewOrChanged +
              " files new or changed, " + bytes(s.bytesAdded) + " added");
            button.type = "button"; button.addEventListener("click", guard(() => { state.snapshot = s; return browse("/"); }));
            item.append(button); list.append(item);
          }
          if (!state.snapshot && snapshots.length) { state.snapshot = snapshots[snapshots.length - 1]; await browse("/"); }
        }

        async function browse(path, focus) {
          state.path = path;
          const t = await api("GET", repoPath("/snapshots/" + state.snapshot.id + "/tree?path=" + encodeURIComponent(path)));
          document.getElementById("tree-path").textContent = state.snapshot.shortId + ":" + t.path;
          const body = document.querySelector("#tree tbody"); body.replaceChildren();
          if (t.path !== "/") {
            const row = el("tr"); const cell = el("td"); const up = el("button", "..");
            up.type = "button"; up.addEventListener("click", guard(() => browse(t.path.replace(/\\/[^/]*$/, "") || "/", true)));
            cell.append(up); row.append(cell); body.append(row);
          }
          for (const e of t.entries) {
            const row = el("tr"); const name = el("td");
            if (e.type === "dir") {
              const b = el("button", e.name + "/"); b.type = "button"; b.addEventListener("click", guard(() => browse(e.path, true))); name.append(b);
            } else name.textContent = e.name;
            const href = repoPath("/snapshots/" + state.snapshot.id + "/download?path=" + encodeURIComponent(e.path));
            const link = el("a", e.type === "dir" ? "tar" : "download"); link.href = href;
            const get = el("td"); get.append(link);
            if (e.type === "dir") { const zip = el("a", "zip"); zip.href = href + "&archive=zip"; get.append(zip); }
            const put = el("td"); const restore = el("button", "restore"); restore.type = "button";
            restore.addEventListener("click", guard(() => restoreEntry(e.path))); put.append(restore);
            const modified = el("td", e.mtime.slice(0, 19).replace("T", " ")); modified.className = "wide";
            row.append(name, el("td", e.type === "file" ? bytes(e.size) : ""), modified, get, put);
            body.append(row);
          }
          if (focus) document.getElementById("tree-path").focus();
        }

        async function follow(job) {
          const bar = document.getElementById("job-progress"); const status = document.getElementById("job-status");
          bar.hidden = false;
          for (;;) {
            const j = await api("GET", "/api/jobs/" + job);
            bar.value = j.totalBytes ? j.bytes / j.totalBytes : 0;
            status.textContent = j.kind + " " + j.state + ": " + j.files + " files, " + bytes(j.bytes) +
              (j.totalBytes ? " of " + bytes(j.totalBytes) : "") + (j.rate ? ", " + bytes(j.rate) + "/s" : "") +
              (j.etaSeconds ? ", " + Math.ceil(j.etaSeconds) + " s left" : "") + (j.error ? " — " + j.error : "") +
              (j.waiting ? " — " + j.waiting : "") +
              (j.snapshot ? " — snapshot " + j.snapshot.slice(0, 8) : "");
            if (j.state !== "running") { bar.hidden = true; return j; }
            await new Promise(r => setTimeout(r, 500));
          }
        }

        async function restoreEntry(path) {
          const target = document.getElementById("restore-target").value.trim();
          if (!target) throw new Error("Name a folder to restore into first.");
          document.getElementById("job-status").textContent = "restore starting";
          const { job } = await api("POST", repoPath("/restore"), { snapshot: state.snapshot.id, path, target });
          const j = await follow(job);
          if (j.state === "done") say("Restored " + path + " into " + target + ".");
        }

        function guard(f) { return async (event) => { if (event) event.preventDefault(); try { await f(event); } catch (e) { say(e.message); } }; }

        document.addEventListener("DOMContentLoaded", () => {
          document.getElementById("add-form").addEventListener("submit", guard(async (event) => {
            const f = new FormData(event.target);
            const lines = (name) => (f.get(name) || "").split("\\n").map(s => s.trim()).filter(s => s);
            const body = { name: f.get("name"), repo: f.get("repo"), paths: lines("paths"), exclude: lines("exclude"),
              init: f.get("init") === "on" };
            if (f.get("every")) body.every = f.get("every");
            if (f.get("password")) body.password = f.get("password");
            await api("POST", "/api/repositories", body);
            event.target.reset(); await loadRepositories(); await select(body.name);
          }));
          document.getElementById("account-form").addEventListener("submit", guard(async (event) => {
            const f = new FormData(event.target);
            const a = await api("POST", "/api/accounts", { server: f.get("server"), user: f.get("user"),
              email: f.get("email") || undefined, password: f.get("password"), register: f.get("register") === "on" });
            event.target.reset(); document.getElementById("account").open = false;
            // The space is a repository to add: its location filled in, the form open.
            document.getElementById("add").open = true;
            const form = document.getElementById("add-form"); form.elements.repo.value = a.repo; form.elements.name.focus();
            say((a.registered ? "Registered and logged in" : "Logged in") + " as " + a.user + " on " + a.server +
              ". Add its space below (tick Create for a new space).");
          }));
          document.getElementById("s3-form").addEventListener("submit", guard(async (event) => {
            const f = new FormData(event.target);
            const b = await api("POST", "/api/s3", { endpoint: f.get("endpoint"), bucket: f.get("bucket"),
              prefix: f.get("prefix") || undefined, region: f.get("region") || undefined,
              accessKeyId: f.get("accessKeyId"), secretAccessKey: f.get("secretAccessKey") });
            event.target.reset(); document.getElementById("s3").open = false;
            // The bucket is a repository to add: its location filled in, the form open.
            document.getElementById("add").open = true;
            const form = document.getElementById("add-form"); form.elements.repo.value = b.repo; form.elements.name.focus();
            say("Saved the keys of " + b.bucket + " (region " + b.region + ") for this device's user. Add the repository below " +
              "(tick Create for a new one).");
          }));
          document.getElementById("unlock-form").addEventListener("submit", guard(async (event) => {
            const password = new FormData(event.target).get("password");
            await api("POST", repoPath("/unlock"), { password }); event.target.reset();
            await loadRepositories(); await select(state.current.name);
          }));
          document.getElementById("lock").addEventListener("click", guard(async () => {
            await api("DELETE", repoPath("/unlock")); await loadRepositories(); await select(state.current.name);
          }));
          document.getElementById("check").addEventListener("click", guard(checkChanges));
          const sync = guard(async () => {
            document.getElementById("job-status").textContent = "sync starting";
            const { job } = await api("POST", repoPath("/sync"));
            await follow(job); state.snapshot = null; await Promise.all([checkChanges(), loadSnapshots()]);
            if (!document.getElementById("space-view").hidden) await loadSpace();
          });
          document.getElementById("sync").addEventListener("click", sync);
          document.getElementById("banner-sync").addEventListener("click", sync);
          document.getElementById("notify").addEventListener("click", guard(async () => {
            await Notification.requestPermission(); document.getElementById("notify").hidden = true;
          }));
          // The schedule's checks: the last one, every two seconds, while a repository is open.
          setInterval(async () => {
            if (!state.current || !state.current.unlocked || document.getElementById("repository").hidden) return;
            try { showChanges(await api("GET", repoPath("/changes?cached=1"))); } catch (e) { /* shown at the next action */ }
          }, 2000);
          document.getElementById("find-form").addEventListener("submit", guard(async (event) => {
            const pattern = new FormData(event.target).get("pattern");
            const r = await api("GET", repoPath("/find?pattern=" + encodeURIComponent(pattern)));
            const list = document.getElementById("found"); list.replaceChildren();
            for (const m of r.matches) list.append(el("li", m.shortId + " " + m.path + " (" + bytes(m.size) + ")"));
          }));
          guard(loadRepositories)();
        });

        """
}
