"""Structural checks of the deployment files that no installed tool makes.

Run by scripts/check-deploy.sh with the tools' venv (PyYAML comes with
kubernetes-validate):

    python3 scripts/lib/check_deploy.py CHECK [ARGS]

Checks (each prints what it checked and exits 1 on the first list of
problems):
    dockerignore     the Dockerfile's COPY sources are not left out of the
                     build context by .dockerignore
    compose          bind-mounted files exist; the nodes form one cluster of
                     3 (bootstrap-expect, join by service name, advertised
                     names); Prometheus scrapes every node's HTTP port
    k8s              cross-references between the manifests (labels and
                     selectors, named ports, probes, ConfigMap/Secret keys,
                     kustomization resources = the files), and the
                     ServiceMonitor (a CRD: no schema is bundled) field by field
    grafana          the dashboard's structure and variables; every metric it
                     queries is in docs/operations.md's metrics table (with
                     _bucket/_sum/_count only on histograms); the provisioning
                     files point at the mounted dashboards
    dashboard-rules OUT
                     writes the dashboard's queries as a Prometheus rule file
                     (Grafana variables replaced) so promtool parses them
"""

import fnmatch
import json
import os
import re
import sys

import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEPLOY = os.path.join(ROOT, "deploy")

# DESIGN.md section 3: the node's ports.
PORTS = {"public": 7100, "internal": 7101, "gossip": 7102, "http": 7103}


def rel(path):
    return os.path.relpath(path, ROOT)


def load_yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


def finish(name, problems, checked):
    for c in checked:
        print(f"  ok   {c}")
    for p in problems:
        print(f"  FAIL {p}")
    if problems:
        print(f"{name}: {len(problems)} problem(s)")
        sys.exit(1)


# --- .dockerignore ---------------------------------------------------------

def dockerignore_excludes(patterns, path):
    """Whether Docker's .dockerignore rules (last match wins, `!` re-includes,
    a pattern matching a directory matches everything under it) leave
    `path` out of the build context."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in patterns:
        negate = raw.startswith("!")
        pat = raw[1:] if negate else raw
        pat = pat.strip("/")
        if not pat:
            continue
        hit = False
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pat) or (
                pat.startswith("**/") and fnmatch.fnmatchcase(prefix.split("/")[-1], pat[3:])
            ):
                hit = True
                break
        if hit:
            excluded = not negate
    return excluded


def check_dockerignore():
    problems, checked = [], []
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        patterns = [l.strip() for l in f if l.strip() and not l.lstrip().startswith("#")]
    with open(os.path.join(DEPLOY, "docker", "Dockerfile")) as f:
        text = f.read().replace("\\\n", " ")
    copies = 0
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].upper() != "COPY" or any(w.startswith("--from") for w in words):
            continue
        for src in words[1:-1]:
            if src.startswith("--"):
                continue
            copies += 1
            if src == ".":
                continue
            if not os.path.exists(os.path.join(ROOT, src)):
                problems.append(f"Dockerfile: COPY {src}: no such file in the repository")
            elif dockerignore_excludes(patterns, src):
                problems.append(f"Dockerfile: COPY {src} is left out of the context by .dockerignore")
    # The workspace must be complete for `cargo build --locked`.
    for needed in ["Cargo.toml", "Cargo.lock", "node/src/main.rs", "chaos/Cargo.toml", "proto/build.rs"]:
        if dockerignore_excludes(patterns, needed):
            problems.append(f".dockerignore leaves out {needed}, which the build needs")
    for big in ["target/release/cell0", ".cluster/node1", "models/all-minilm-l6-v2/model.safetensors", ".git/HEAD"]:
        if not dockerignore_excludes(patterns, big):
            problems.append(f".dockerignore lets {big} into the build context")
    checked.append(f"Dockerfile: {copies} COPY sources exist and are in the build context; target/, .cluster/, models/, .git stay out")
    finish("dockerignore", problems, checked)


# --- compose ---------------------------------------------------------------

def env_of(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def check_compose():
    problems, checked = [], []
    path = os.path.join(DEPLOY, "docker", "compose.yaml")
    base = os.path.dirname(path)
    doc = load_yaml(path)
    services = doc.get("services", {})
    nodes = sorted(n for n, s in services.items() if str(s.get("image", "")).startswith("cell0"))
    if len(nodes) != 3:
        problems.append(f"compose: expected 3 cell0 services, found {nodes}")
    for name in nodes:
        s = services[name]
        env = env_of(s)
        if env.get("CELL0_BOOTSTRAP_EXPECT") != "3":
            problems.append(f"compose: {name}: CELL0_BOOTSTRAP_EXPECT is {env.get('CELL0_BOOTSTRAP_EXPECT')!r}, not 3")
        if not env.get("CELL0_GOSSIP_SECRET", "").startswith("${CELL0_GOSSIP_SECRET"):
            problems.append(f"compose: {name}: CELL0_GOSSIP_SECRET must come from the environment")
        joins = [j for j in env.get("CELL0_JOIN", "").split(",") if j]
        want = sorted(f"{n}:{PORTS['gossip']}" for n in nodes if n != name)
        if sorted(joins) != want:
            problems.append(f"compose: {name}: CELL0_JOIN is {joins}, expected the other nodes' gossip ports {want}")
        for var, port in [("CELL0_ADVERTISE_PUBLIC", "public"), ("CELL0_ADVERTISE_INTERNAL", "internal"),
                          ("CELL0_ADVERTISE_GOSSIP", "gossip")]:
            if env.get(var) != f"{name}:{PORTS[port]}":
                problems.append(f"compose: {name}: {var} is {env.get(var)!r}, expected {name}:{PORTS[port]}")
        if env.get("CELL0_LISTEN_GOSSIP") != f"0.0.0.0:{PORTS['gossip']}":
            problems.append(f"compose: {name}: CELL0_LISTEN_GOSSIP must be 0.0.0.0:{PORTS['gossip']}")
        if env.get("CELL0_NAME") != name:
            problems.append(f"compose: {name}: CELL0_NAME is {env.get('CELL0_NAME')!r}")
        mounts = [v.split(":")[1] for v in s.get("volumes", []) if isinstance(v, str)]
        if "/var/lib/cell0" not in mounts:
            problems.append(f"compose: {name}: no volume on /var/lib/cell0")
        published = [str(p).rsplit(":", 1)[-1] for p in s.get("ports", [])]
        for p in published:
            if int(p) not in (PORTS["public"], PORTS["http"]):
                problems.append(f"compose: {name} publishes container port {p}: only public gRPC and HTTP should leave the host network")
    checked.append(f"compose: {len(nodes)} nodes: bootstrap-expect 3, each joins the others by service name, advertises its service name, secret from the environment, data volume")
    # Bind mounts (./ and ../) exist.
    binds = 0
    for name, s in services.items():
        for v in s.get("volumes", []):
            src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
            if src.startswith("."):
                binds += 1
                if not os.path.exists(os.path.normpath(os.path.join(base, src))):
                    problems.append(f"compose: {name}: bind mount {src} does not exist")
    named = set(doc.get("volumes", {}))
    for name, s in services.items():
        for v in s.get("volumes", []):
            src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
            if not src.startswith(".") and not src.startswith("/") and src not in named:
                problems.append(f"compose: {name}: volume {src} is not declared under volumes:")
    checked.append(f"compose: {binds} bind-mounted paths exist; named volumes are declared")
    # Prometheus: config file mounted where --config.file says; scrapes every node.
    prom = services.get("prometheus", {})
    cfg = [a.split("=", 1)[1] for a in prom.get("command", []) if a.startswith("--config.file=")]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in prom.get("volumes", []) if isinstance(v, str)}
    if not cfg or cfg[0] not in mounted:
        problems.append(f"compose: prometheus: --config.file {cfg} is not a mounted file")
    else:
        host_cfg = os.path.normpath(os.path.join(base, mounted[cfg[0]]))
        pconf = load_yaml(host_cfg)
        for rf in pconf.get("rule_files", []):
            in_container = os.path.normpath(os.path.join(os.path.dirname(cfg[0]), rf))
            if in_container not in mounted:
                problems.append(f"compose: prometheus: rule file {rf} resolves to {in_container}, which is not mounted")
            elif os.path.normpath(os.path.join(base, mounted[in_container])) != os.path.normpath(os.path.join(os.path.dirname(host_cfg), rf)):
                problems.append(f"compose: prometheus: {in_container} is not the file {rf} names in the repository")
        jobs = {j["job_name"]: j for j in pconf.get("scrape_configs", [])}
        if "cell0" not in jobs:
            problems.append("prometheus.yml: no job cell0 (the alert rules expect job=\"cell0\")")
        else:
            targets = sorted(t for sc in jobs["cell0"].get("static_configs", []) for t in sc.get("targets", []))
            want = sorted(f"{n}:{PORTS['http']}" for n in nodes)
            if targets != want:
                problems.append(f"prometheus.yml: job cell0 scrapes {targets}, expected {want}")
        checked.append("compose: Prometheus loads the mounted prometheus.yml and alerts.yml (same relative paths as in the repository) and scrapes every node as job cell0")
    # Grafana: provisioning dir and dashboards mounted where the provider reads.
    graf = services.get("grafana", {})
    gm = {v.split(":")[1]: v.split(":")[0] for v in graf.get("volumes", []) if isinstance(v, str)}
    prov = gm.get("/etc/grafana/provisioning")
    if not prov:
        problems.append("compose: grafana: no provisioning directory mounted")
    else:
        prov_dir = os.path.normpath(os.path.join(base, prov))
        for f in sorted(os.listdir(os.path.join(prov_dir, "dashboards"))):
            for p in load_yaml(os.path.join(prov_dir, "dashboards", f)).get("providers", []):
                path = p.get("options", {}).get("path")
                if path not in gm:
                    problems.append(f"grafana provider {p.get('name')}: path {path} is not mounted in compose")
                else:
                    dash_dir = os.path.normpath(os.path.join(base, gm[path]))
                    if not any(n.endswith(".json") for n in os.listdir(dash_dir)):
                        problems.append(f"grafana provider {p.get('name')}: {rel(dash_dir)} holds no dashboard")
        home = env_of(graf).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
        if home:
            d, f = os.path.split(home)
            if d not in gm or not os.path.exists(os.path.join(base, gm[d], f)):
                problems.append(f"compose: grafana: home dashboard {home} is not a mounted file")
        for f in sorted(os.listdir(os.path.join(prov_dir, "datasources"))):
            for ds in load_yaml(os.path.join(prov_dir, "datasources", f)).get("datasources", []):
                if ds.get("type") != "prometheus" or not str(ds.get("url", "")).startswith("http://prometheus:"):
                    problems.append(f"grafana datasource {ds.get('name')}: not the compose Prometheus service")
        checked.append("compose: Grafana's provisioning (data source -> prometheus service, dashboard provider -> mounted deploy/grafana) is mounted and consistent")
    finish("compose", problems, checked)


# --- Kubernetes --------------------------------------------------------------

SERVICEMONITOR_SPEC = {"jobLabel", "targetLabels", "podTargetLabels", "endpoints", "selector", "namespaceSelector",
                       "sampleLimit", "scrapeProtocols", "targetLimit", "labelLimit", "labelNameLengthLimit",
                       "labelValueLengthLimit", "keepDroppedTargets", "attachMetadata", "scrapeClass",
                       "fallbackScrapeProtocol", "bodySizeLimit", "selectorMechanism", "serviceDiscoveryRole",
                       "scrapeClassicHistograms", "nativeHistogramBucketLimit", "nativeHistogramMinBucketFactor",
                       "convertClassicHistogramsToNHCB"}
SERVICEMONITOR_ENDPOINT = {"port", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout", "tlsConfig",
                           "bearerTokenFile", "bearerTokenSecret", "authorization", "honorLabels", "honorTimestamps",
                           "trackTimestampsStaleness", "basicAuth", "oauth2", "metricRelabelings", "relabelings",
                           "proxyUrl", "noProxy", "proxyFromEnvironment", "proxyConnectHeader", "followRedirects",
                           "enableHttp2", "filterRunning"}
DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_k8s():
    problems, checked = [], []
    k8s = os.path.join(DEPLOY, "k8s")
    kust = load_yaml(os.path.join(k8s, "kustomization.yaml"))
    listed = kust.get("resources", [])
    files = sorted(f for f in os.listdir(k8s) if f.endswith((".yaml", ".yml")) and f != "kustomization.yaml")
    if sorted(listed) != files:
        problems.append(f"kustomization.yaml lists {sorted(listed)}, the directory holds {files}")
    checked.append(f"kustomization.yaml lists exactly the {len(files)} manifests of deploy/k8s")
    objs = {}
    for f in files:
        for doc in yaml.safe_load_all(open(os.path.join(k8s, f))):
            if doc:
                objs[(doc["kind"], doc["metadata"]["name"])] = doc
    sts = [o for (k, _), o in objs.items() if k == "StatefulSet"]
    if len(sts) != 1:
        problems.append(f"expected one StatefulSet, found {len(sts)}")
        finish("k8s", problems, checked)
    sts = sts[0]
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    if not matches(spec["selector"]["matchLabels"], pod_labels):
        problems.append("StatefulSet: selector does not match the pod labels")
    if spec.get("replicas") != 3 or spec.get("podManagementPolicy") != "Parallel":
        problems.append("StatefulSet: must run 3 replicas with podManagementPolicy Parallel (bootstrap_expect 3)")
    if not pod.get("terminationGracePeriodSeconds"):
        problems.append("StatefulSet: no terminationGracePeriodSeconds")
    if not spec.get("volumeClaimTemplates"):
        problems.append("StatefulSet: no volumeClaimTemplates")
    c = pod["containers"][0]
    cports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    want_ports = {"grpc": PORTS["public"], "internal": PORTS["internal"], "gossip": PORTS["gossip"], "http": PORTS["http"]}
    if cports != want_ports:
        problems.append(f"StatefulSet: container ports {cports}, expected {want_ports} (DESIGN.md section 3)")
    for probe, path in [("readinessProbe", "/ready"), ("livenessProbe", "/health"), ("startupProbe", "/health")]:
        g = c.get(probe, {}).get("httpGet", {})
        if g.get("path") != path or cports.get(g.get("port"), g.get("port")) != PORTS["http"]:
            problems.append(f"StatefulSet: {probe} must GET {path} on the HTTP port, is {g}")
    pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    if pre[:3] != ["cell0", "node", "leave"] or "--endpoint" not in pre or not pre[pre.index("--endpoint") + 1].endswith(f":{PORTS['public']}"):
        problems.append(f"StatefulSet: preStop must run `cell0 node leave --endpoint <own public address>`, is {pre}")
    checked.append("StatefulSet: 3 replicas, Parallel, selector = pod labels, ports 7100-7103, readiness /ready, liveness and startup /health on the HTTP port, preStop `cell0 node leave`, grace period, volume claims")
    # Volumes and mounts.
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    claims = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
    for m in c.get("volumeMounts", []):
        if m["name"] not in vols and m["name"] not in claims:
            problems.append(f"StatefulSet: volumeMount {m['name']} has no volume")
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    env = {e["name"]: e for e in c.get("env", [])}
    cfg_path = env.get("CELL0_CONFIG", {}).get("value", "")
    cfg_dir, cfg_file = os.path.split(cfg_path)
    cfg_vol = vols.get(mounts.get(cfg_dir, ""), {})
    cm = objs.get(("ConfigMap", cfg_vol.get("configMap", {}).get("name", "")))
    if not cm or cfg_file not in cm.get("data", {}):
        problems.append(f"StatefulSet: CELL0_CONFIG={cfg_path} is not a key of a mounted ConfigMap")
    else:
        toml_text = cm["data"][cfg_file]
        for key, want in [("data_dir", "/var/lib/cell0/"), ("bootstrap_expect", "3")]:
            if not re.search(rf"^{key} = \"?{re.escape(want)}", toml_text, re.M):
                problems.append(f"ConfigMap {cfg_file}: {key} should start with {want}")
        data_mount = [p for p, n in mounts.items() if n in claims]
        if not data_mount or not re.search(rf'^data_dir = "{re.escape(data_mount[0])}/[^"]+"', toml_text, re.M):
            problems.append(f"ConfigMap {cfg_file}: data_dir must be a subdirectory of the data volume {data_mount}")
        for m in re.finditer(r'^\w+_file = "([^"]+)"', toml_text, re.M):
            d, f = os.path.split(m.group(1))
            v = vols.get(mounts.get(d, ""), {})
            if "secret" not in v:
                problems.append(f"ConfigMap {cfg_file}: {m.group(1)} is not in a mounted Secret")
        joins = re.search(r"^join = \[(.*)\]", toml_text, re.M)
        want = [f'"{sts["metadata"]["name"]}-{i}.{spec["serviceName"]}:{PORTS["gossip"]}"' for i in range(spec["replicas"])]
        if not joins or [j.strip() for j in joins.group(1).split(",")] != want:
            problems.append(f"ConfigMap {cfg_file}: join should be {', '.join(want)}")
    for name, e in env.items():
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            sec = objs.get(("Secret", ref["name"]))
            if not sec or ref["key"] not in {**sec.get("stringData", {}), **sec.get("data", {})}:
                problems.append(f"StatefulSet: env {name} refers to missing Secret key {ref['name']}/{ref['key']}")
    for var, port in [("CELL0_ADVERTISE_PUBLIC", "public"), ("CELL0_ADVERTISE_INTERNAL", "internal"), ("CELL0_ADVERTISE_GOSSIP", "gossip")]:
        want = f"$(POD_NAME).{spec['serviceName']}:{PORTS[port]}"
        if env.get(var, {}).get("value") != want:
            problems.append(f"StatefulSet: {var} should be {want}")
    checked.append("StatefulSet: mounts have volumes; CELL0_CONFIG is a mounted ConfigMap key (data_dir under the data volume, TLS files in a mounted Secret, join = every pod's gossip address); Secret keys exist; advertised addresses are the pods' headless names")
    # Services.
    headless = objs.get(("Service", spec["serviceName"]))
    if not headless:
        problems.append(f"no Service {spec['serviceName']} (the StatefulSet's serviceName)")
    else:
        hs = headless["spec"]
        if hs.get("clusterIP") != "None" or hs.get("publishNotReadyAddresses") is not True:
            problems.append("headless Service: needs clusterIP None and publishNotReadyAddresses true")
    services = [o for (k, _), o in objs.items() if k == "Service"]
    for s in services:
        if not matches(s["spec"].get("selector"), pod_labels):
            problems.append(f"Service {s['metadata']['name']}: selector does not match the pods")
        for p in s["spec"].get("ports", []):
            tp = p.get("targetPort", p["port"])
            if (tp not in cports) if isinstance(tp, str) else (tp not in cports.values()):
                problems.append(f"Service {s['metadata']['name']}: targetPort {tp} is not a container port")
            elif cports.get(tp, tp) != p["port"]:
                problems.append(f"Service {s['metadata']['name']}: port {p['port']} goes to {tp}")
    if len(services) < 2:
        problems.append("expected a headless and a client Service")
    checked.append(f"{len(services)} Services select the pods and target named container ports; the headless one publishes not-ready addresses")
    pdbs = [o for (k, _), o in objs.items() if k == "PodDisruptionBudget"]
    if len(pdbs) != 1 or pdbs[0]["spec"].get("maxUnavailable") != 1 or not matches(pdbs[0]["spec"]["selector"]["matchLabels"], pod_labels):
        problems.append("PodDisruptionBudget: one, maxUnavailable 1, selecting the pods")
    checked.append("PodDisruptionBudget: maxUnavailable 1 over the pods")
    # ServiceMonitor (CRD monitoring.coreos.com/v1; kubernetes-validate has no schema for it).
    sms = [o for (k, _), o in objs.items() if k == "ServiceMonitor"]
    if len(sms) != 1:
        problems.append(f"expected one ServiceMonitor, found {len(sms)}")
    else:
        sm = sms[0]
        if sm.get("apiVersion") != "monitoring.coreos.com/v1":
            problems.append(f"ServiceMonitor: apiVersion {sm.get('apiVersion')}")
        extra = set(sm) - {"apiVersion", "kind", "metadata", "spec"}
        extra |= set(sm.get("spec", {})) - SERVICEMONITOR_SPEC
        if extra:
            problems.append(f"ServiceMonitor: unknown fields {sorted(extra)}")
        sel = sm["spec"].get("selector", {}).get("matchLabels", {})
        target = [s for s in services if matches(sel, s["metadata"].get("labels", {}))]
        if len(target) != 1:
            problems.append(f"ServiceMonitor: selector {sel} matches {len(target)} Services, expected one")
        eps = sm["spec"].get("endpoints", [])
        if not eps:
            problems.append("ServiceMonitor: no endpoints")
        for ep in eps:
            unknown = set(ep) - SERVICEMONITOR_ENDPOINT
            if unknown:
                problems.append(f"ServiceMonitor endpoint: unknown fields {sorted(unknown)}")
            if target and ep.get("port") not in {p.get("name") for p in target[0]["spec"]["ports"]}:
                problems.append(f"ServiceMonitor endpoint: port {ep.get('port')} is not a port name of {target[0]['metadata']['name']}")
            if target and next((p["port"] for p in target[0]["spec"]["ports"] if p.get("name") == ep.get("port")), None) != PORTS["http"]:
                problems.append("ServiceMonitor endpoint: must scrape the HTTP port 7103")
            if ep.get("path", "/metrics") != "/metrics":
                problems.append(f"ServiceMonitor endpoint: path {ep.get('path')}")
            for k in ("interval", "scrapeTimeout"):
                if k in ep and not DURATION.match(str(ep[k])):
                    problems.append(f"ServiceMonitor endpoint: {k} {ep[k]!r} is not a Prometheus duration")
        job = sm["spec"].get("jobLabel")
        if target and target[0]["metadata"].get("labels", {}).get(job) != "cell0":
            problems.append("ServiceMonitor: the job label must come out as cell0 (alerts.yml uses up{job=\"cell0\"})")
        checked.append("ServiceMonitor: apiVersion, known fields only, selects exactly the headless Service, scrapes its HTTP port at /metrics with valid durations, job label cell0")
    finish("k8s", problems, checked)


# --- Grafana -----------------------------------------------------------------

def documented_metrics():
    """{name: type} from the metrics table of docs/operations.md."""
    with open(os.path.join(ROOT, "docs", "operations.md")) as f:
        text = f.read()
    section = text.split("## Metrics", 1)[1]
    section = re.split(r"\n## ", section, 1)[0]
    out = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3:
            continue
        for name in re.findall(r"`(cell0_[a-z0-9_]+)", cells[0]):
            out[name] = cells[1]
    return out


def dashboard_targets(dash):
    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))
    for p in walk(dash.get("panels", [])):
        for t in p.get("targets", []):
            yield p, t


def check_grafana():
    problems, checked = [], []
    path = os.path.join(DEPLOY, "grafana", "cell0.json")
    try:
        with open(path) as f:
            dash = json.load(f)
    except ValueError as e:
        finish("grafana", [f"{rel(path)}: not JSON: {e}"], [])
    for key in ("uid", "title", "schemaVersion", "panels", "templating"):
        if key not in dash:
            problems.append(f"dashboard: no {key}")
    if dash.get("schemaVersion", 0) < 36:
        problems.append(f"dashboard: schemaVersion {dash.get('schemaVersion')} is old (36+)")
    if "id" in dash and dash["id"] is not None:
        problems.append("dashboard: a provisioned dashboard must not carry an id")
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    if variables.get("datasource", {}).get("type") != "datasource" or variables["datasource"].get("query") != "prometheus":
        problems.append("dashboard: needs a datasource variable of type prometheus")
    if variables.get("instance", {}).get("type") != "query":
        problems.append("dashboard: needs an instance query variable")
    ids, panels = set(), 0
    for p in dash.get("panels", []):
        if p["id"] in ids:
            problems.append(f"dashboard: panel id {p['id']} twice")
        ids.add(p["id"])
        g = p.get("gridPos", {})
        if g.get("x", 0) + g.get("w", 0) > 24:
            problems.append(f"dashboard: panel {p.get('title')} is wider than the grid")
        if p.get("type") != "row":
            panels += 1
            if p.get("datasource", {}).get("uid") != "${datasource}":
                problems.append(f"dashboard: panel {p.get('title')} does not use the $datasource variable")
    docs = documented_metrics()
    used, exprs = set(), 0
    for p, t in dashboard_targets(dash):
        exprs += 1
        expr = t.get("expr", "")
        if "$instance" not in expr:
            problems.append(f"dashboard: {p.get('title')}: query ignores $instance: {expr}")
        for m in re.findall(r"\bcell0_[a-z0-9_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", m)
            if m in docs:
                used.add(m)
            elif base in docs and docs[base] == "histogram":
                used.add(base)
            elif base in docs:
                problems.append(f"dashboard: {p.get('title')}: {m}: {base} is a {docs[base]}, not a histogram")
            else:
                problems.append(f"dashboard: {p.get('title')}: {m} is not in docs/operations.md's metrics table")
    checked.append(f"dashboard: JSON, uid {dash.get('uid')!r}, schemaVersion {dash.get('schemaVersion')}, variables datasource + instance, {panels} panels with unique ids on the $datasource variable")
    checked.append(f"dashboard: {exprs} queries use {len(used)} metrics, all in docs/operations.md's metrics table ({len(docs)} documented)")
    for needed in ("cell0_raft_leader_changes_total", "cell0_write_duration_seconds", "cell0_raft_applied_index",
                   "cell0_raft_last_log_index", "cell0_grpc_requests_total", "cell0_grpc_request_duration_seconds",
                   "cell0_inference_batch_size", "cell0_scheduler_unplaced_agents", "cell0_agents_running"):
        if needed not in used:
            problems.append(f"dashboard: no panel shows {needed}")
    finish("grafana", problems, checked)


def dashboard_rules(out):
    with open(os.path.join(DEPLOY, "grafana", "cell0.json")) as f:
        dash = json.load(f)
    rules = []
    for i, (p, t) in enumerate(dashboard_targets(dash)):
        expr = t["expr"]
        for var, value in [("$__rate_interval", "1m"), ("$__interval", "15s"), ("$__range", "1h"), ("$instance", ".*")]:
            expr = expr.replace(var, value)
        if "$" in expr.replace("{{", "").replace("}}", ""):
            print(f"  FAIL dashboard query uses an unknown variable: {t['expr']}")
            sys.exit(1)
        rules.append({"record": f"cell0:dashboard_query_{i}", "expr": expr})
    with open(out, "w") as f:
        yaml.safe_dump({"groups": [{"name": "cell0-dashboard-queries", "rules": rules}]}, f, sort_keys=False)
    print(f"  ok   wrote the dashboard's {len(rules)} queries as recording rules to {out}")


if __name__ == "__main__":
    check = sys.argv[1] if len(sys.argv) > 1 else ""
    if check == "dockerignore":
        check_dockerignore()
    elif check == "compose":
        check_compose()
    elif check == "k8s":
        check_k8s()
    elif check == "grafana":
        check_grafana()
    elif check == "dashboard-rules" and len(sys.argv) == 3:
        dashboard_rules(sys.argv[2])
    else:
        print(__doc__)
        sys.exit(2)
