"use strict";
// The desk page of mkiso: only the JSON API, no external assets. Patient data stays out of URLs
// (accession numbers only); the desk key, when needed, lives in sessionStorage for this tab.
// Served as a file of its own (not inline) so that the page's CSP can forbid inline script.
//
// It never offers the wrong patient's disc: a new lookup, an error or any edit of the accession
// numbers clears every earlier result, progress line and link (reset), and an answer that arrives
// after such a reset is dropped (each reset starts a new "generation"). The ready line names whose
// disc it is, from the lookup that the disc was started from.
const KEY = "mkiso-api-key";
const $ = (id) => document.getElementById(id);
let lookedUp = null; // {accessions, patients}: what the table shows
let job = null; // the job being shown, with the patients of the lookup it came from
let generation = 0;

class ApiError extends Error {
  constructor(message, code, status, requestId) {
    super(message); this.code = code; this.status = status; this.requestId = requestId;
  }
}

// An error the clerk cannot act on (the PACS, the publisher, the server: a 5xx other than "busy") is told
// as what happened and the code to give IT; its technical line, which names AE titles, ports and DICOM
// status codes, is folded beneath for IT. The clerk's own (a number not found, two patients) stay as they are.
const FOR_IT = {
  pacs_failed: "The PACS did not answer.", pacs_unknown_ae: "The PACS did not answer.",
  timeout: "The PACS did not answer.",
  move_destination_unknown: "The PACS could not send the images to this service.",
  receiver_unreachable: "The PACS could not send the images to this service.",
  publisher_failed: "The disc publisher did not answer.", publisher_timeout: "The disc publisher did not answer.",
  insufficient_storage: "The disc service is out of room.", work_dir_unwritable: "The disc service is out of room.",
};

function forIT(error) {
  if (!(error.status >= 500) || error.code === "busy") return "";
  return FOR_IT[error.code] || (error.status === 502 ? "The PACS did not send the study as it should."
    : "The disc could not be made.");
}

function explain(element, error) {
  // Everything as text nodes: a message may quote what the PACS said.
  const sentence = forIT(error);
  if (!sentence) { element.textContent = error.message; return; }
  const lead = document.createElement("span");
  lead.textContent = sentence + " Please call IT and give them this code: " + (error.code || error.status) + ".";
  const details = document.createElement("details");
  details.className = "for-it";
  const summary = document.createElement("summary");
  summary.textContent = "Details for IT";
  const line = document.createElement("p");
  line.textContent = error.message + (error.requestId ? " (request " + error.requestId + ")" : "");
  details.append(summary, line);
  element.replaceChildren(lead, details);
}

function askForKey() {
  $("key-panel").hidden = false;
  $("api-key").focus();
}

async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) headers["X-API-Key"] = key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiError("The service cannot be reached. Check the network and try again.");
  }
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (response.status === 401) {
    sessionStorage.removeItem(KEY);
    askForKey();
    throw new ApiError(key ? "That desk key was not accepted. Please enter it again."
      : "Please enter the desk key from IT first.");
  }
  if (!response.ok) {
    throw new ApiError(data && data.error ? data.error : "The service answered with an error (" + response.status + ").",
      data && data.code, response.status, (data && data.request_id) || response.headers.get("X-Request-ID"));
  }
  return data;
}

function say(text, bad) {
  $("message").textContent = text;
  $("message").className = bad ? "bad" : "";
}

function reset() {
  // Everything an earlier lookup or job put on the page goes: nothing of it may be clicked any more.
  generation += 1;
  lookedUp = null;
  job = null;
  $("found").hidden = true;
  $("studies").replaceChildren();
  $("job").hidden = true;
  $("bar").value = 0;
  $("bar").textContent = "";
  $("status").textContent = "";
  $("status").className = "";
  const link = $("iso-link");
  link.hidden = true;
  link.removeAttribute("href");
  $("disc-links").hidden = true;
  $("disc-links").replaceChildren();
  say("");
}

function fail(error) {
  reset();
  explain($("message"), error);
  $("message").className = "bad";
}

function personName(value) {
  const parts = (value || "").split("=")[0].split("^");
  return parts.length > 1 && parts[1] ? parts[0] + ", " + parts.slice(1).filter(Boolean).join(" ") : parts[0];
}

function dicomDate(value) {
  return /^\d{8}$/.test(value || "") ? value.slice(0, 4) + "-" + value.slice(4, 6) + "-" + value.slice(6) : (value || "");
}

function cell(row, text, number) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (number) td.className = "number";
}

function notFound(error, accessions) {
  // Accession numbers are exact DICOM match keys: "acc2001" is not "ACC2001".
  const lower = accessions.filter((accession) => accession !== accession.toUpperCase());
  if (error.code === "study_not_found" && lower.length) {
    error.message += " Accession numbers are matched exactly, capital letters included: "
      + lower.map((accession) => accession + " is not " + accession.toUpperCase()).join(", ") + ".";
  }
  return error;
}

async function lookUp(event) {
  if (event) event.preventDefault();
  reset();
  const mine = generation;
  const accessions = $("accessions").value.split(/[\s,;]+/).filter(Boolean);
  if (!accessions.length) { say("Type or paste at least one accession number.", true); $("accessions").focus(); return; }
  say("Looking up " + accessions.length + " accession number" + (accessions.length > 1 ? "s" : "") + "...");
  $("lookup").disabled = true;
  try {
    const data = await api("GET", "/api/studies?accession_numbers=" + encodeURIComponent(accessions.join(",")));
    if (mine !== generation) return;
    const body = $("studies");
    let images = 0;
    for (const study of data.studies) {
      const row = body.insertRow();
      cell(row, personName(study.patient_name));
      cell(row, study.patient_id);
      cell(row, dicomDate(study.date));
      cell(row, (study.modalities || []).join(", "));
      cell(row, study.description);
      cell(row, study.accession);
      cell(row, study.series, true);
      cell(row, study.images, true);
      images += study.images || 0;
    }
    lookedUp = { accessions, patients: [...new Set(data.studies.map((study) => personName(study.patient_name)))] };
    say(data.studies.length + " stud" + (data.studies.length === 1 ? "y" : "ies") + " found, " + images + " images.");
    $("found").hidden = false;
    $("download").focus();
  } catch (e) {
    if (mine === generation) fail(notFound(e, accessions));
  } finally {
    $("lookup").disabled = false;
  }
}

const PHASES = { queued: "Waiting for a free slot", find: "Asking the PACS", manifest: "Asking the PACS",
  retrieve: "Receiving images", stage: "Laying out the disc", dicomdir: "Writing the DICOMDIR",
  size: "Sizing the disc", iso: "Writing the disc image", verify: "Checking the disc", send: "Sending to the publisher" };
const WEIGHT = { queued: 0, find: 2, manifest: 4, stage: 82, dicomdir: 86, size: 90, iso: 94, verify: 97, send: 80 };

function megabytes(bytes) { return (bytes / 1e6).toFixed(1) + " MB"; }

function whose(current) {
  // "Müller, Jürgen (MR.180505.026, ACC1002)": the patient as the lookup showed, the job's own accessions.
  return current.patients.join("; ") + " (" + current.accessions.join(", ") + ")";
}

function show(update) {
  const current = job = Object.assign(update, { patients: job.patients });
  const p = current.progress;
  let percent = WEIGHT[p.phase] || 0;
  if (p.phase === "retrieve" && p.images_expected) percent = 5 + 75 * Math.min(1, p.images_received / p.images_expected);
  let text = PHASES[p.phase] || "Working";
  // The count comes in as it can: a PACS may say how many only once its manifest is in, after the images.
  if (p.phase === "retrieve") text += ": " + p.images_received + (p.images_expected ? " of " + p.images_expected : "");
  let kind = "";
  let failure = null;
  const link = $("iso-link");
  const list = $("disc-links");
  link.hidden = list.hidden = true;
  link.removeAttribute("href");
  list.replaceChildren();
  if (current.state === "ready" && current.discs.length > 1) {
    percent = 100;
    text = "The " + current.discs.length + " discs for " + whose(current) + " are ready ("
      + megabytes(p.disc_bytes) + ").";
    kind = "good";
    for (const disc of current.discs) {
      const item = document.createElement("li");
      const a = document.createElement("a");
      a.href = disc.links[disc.format || "iso"];
      a.setAttribute("download", "");
      a.className = "button";
      a.textContent = (disc.format === "zip" ? "ZIP " : "Disc ") + disc.number + " of " + current.discs.length
        + " (" + disc.images + " images, " + megabytes(disc.bytes) + ")";
      item.appendChild(a);
      list.appendChild(item);
    }
    list.hidden = false;
  } else if (current.state === "ready") {
    percent = 100;
    const zip = current.format === "zip";
    text = "The disc for " + whose(current) + " is ready" + (zip ? " as a ZIP for a USB stick (" : " (")
      + megabytes(p.disc_bytes) + ").";
    kind = "good";
    link.href = current.links[zip ? "zip" : "iso"];
    link.textContent = zip ? "Download the ZIP for a USB stick" : "Download the disc image";
    link.setAttribute("download", "");
    link.hidden = false;
  } else if (current.state === "done") {
    percent = 100;
    text = current.action === "print"
      ? "Sent to the disc publisher for " + whose(current) + ": "
        + (current.result ? current.result.instances : p.images_received) + " images."
      : "Done.";
    kind = "good";
  } else if (current.state === "failed") {
    text = current.error ? current.error.error : "The job failed.";
    kind = "bad";
    failure = current.error && new ApiError(current.error.error, current.error.code, current.error.status,
      current.error.request_id);
  } else if (current.state === "cancelled") {
    text = "Cancelled. Nothing was kept.";
    kind = "bad";
  }
  $("bar").value = Math.round(percent);
  $("bar").textContent = Math.round(percent) + " %";
  if (failure) explain($("status"), failure);
  else $("status").textContent = text;
  $("status").className = kind;
  $("cancel").hidden = ["failed", "cancelled", "done"].includes(current.state);
  $("cancel").textContent = current.state === "ready" ? "Discard the disc" : "Cancel";
  if (current.state === "ready") (list.hidden ? link : list.querySelector("a")).focus();
}

function showing(current) {
  return job !== null && job.id === current.id;
}

async function follow(current) {
  // Server-sent events read with fetch (EventSource cannot send the key header).
  const ended = (state) => ["ready", "done", "failed", "cancelled"].includes(state);
  const headers = {};
  const key = sessionStorage.getItem(KEY);
  if (key) headers["X-API-Key"] = key;
  try {
    const response = await fetch(current.links.events, { headers });
    if (!response.ok || !response.body) throw new Error("no stream");
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    while (showing(current)) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const chunk = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of chunk.split("\n")) {
          if (line.startsWith("data: ") && showing(current)) show(JSON.parse(line.slice(6)));
        }
      }
    }
    reader.cancel();
  } catch (e) {
    // the stream broke (a proxy, the network): ask now and then instead
  }
  while (showing(current) && !ended(job.state)) {
    await new Promise((resolve) => setTimeout(resolve, 2000));
    try {
      const update = await api("GET", current.links.self);
      if (showing(current)) show(update);
    } catch (e) {
      if (showing(current)) fail(e);
      return;
    }
  }
}

const STARTERS = ["download", "download-zip", "print"];

async function start(action, format) {
  if (!lookedUp) return;
  const mine = generation;
  const from = lookedUp;
  for (const id of STARTERS) $(id).disabled = true;
  try {
    // split: what does not fit on one disc (iso.media) becomes several, each complete
    const asked = { accessions: from.accessions, action, split: true };
    if (format) asked.format = format;
    const created = await api("POST", "/api/jobs", asked);
    if (mine !== generation) return;
    job = { patients: from.patients };
    $("job").hidden = false;
    show(created);
    $("cancel").focus();
    follow(job);
  } catch (e) {
    if (mine === generation) fail(e);
  } finally {
    for (const id of STARTERS) $(id).disabled = false;
  }
}

async function cancel() {
  if (!job) return;
  const current = job;
  $("cancel").disabled = true;
  try {
    const update = await api("DELETE", current.links.self);
    if (showing(current)) show(update);
  } catch (e) {
    if (showing(current)) fail(e);
  } finally { $("cancel").disabled = false; }
}

async function settings() {
  // Whether printing is configured and a key is needed: asked without a key (GET /api/desk).
  try {
    const desk = await api("GET", "/api/desk");
    $("print").hidden = !desk.printing;
    $("download-zip").hidden = !desk.zip;
    if (desk.key_required && !sessionStorage.getItem(KEY)) askForKey();
  } catch (e) {
    // the button stays hidden; the first lookup will say what is wrong
  }
}

$("lookup-form").addEventListener("submit", lookUp);
$("accessions").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); lookUp(); }
});
$("accessions").addEventListener("input", reset);
$("download").addEventListener("click", () => start("download"));
$("download-zip").addEventListener("click", () => start("download", "zip"));
$("print").addEventListener("click", () => start("print"));
$("cancel").addEventListener("click", cancel);
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("api-key").value.trim());
  $("api-key").value = "";
  $("key-panel").hidden = true;
  say("Key saved for this tab.");
  if ($("accessions").value.trim()) lookUp();
  else $("accessions").focus();
});
$("accessions").focus();
settings();
