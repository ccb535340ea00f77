//! The OHIF viewer, served by Kade under `/viewer/`.
//!
//! `kade viewer install` fetches the released `@ohif/app` package from the npm registry (its
//! `dist/` is a prebuilt app), rewrites the root paths the build hard-codes to `/viewer/`
//! (the prebuilt app is built for `/`, and OHIF's `routerBasename` alone does not move its
//! assets), writes an `app-config.js` pointing at Kade's own `/dicom-web`, and adds a small
//! sign-in step: the viewer's requests carry `Authorization: Bearer TOKEN` with a token kept in
//! the browser's localStorage. A link `https://HOST:8443/viewer/#token=TOKEN` signs in (the
//! fragment never reaches a server or a log); without a token the viewer sends the user to
//! `/viewer/kade-login.html`.
//!
//! The viewer's files hold no patient data and are served without authentication; every
//! DICOMweb request the viewer makes is authenticated and audited like any other.

use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

/// The OHIF release `kade viewer install` fetches by default (checked with Kade's tests).
pub const DEFAULT_VERSION: &str = "3.13.2";

/// The viewer's directory inside the data directory.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("viewer")
}

/// Installs the viewer into `DATA_DIR/viewer` from `tarball` (an `npm pack` of `@ohif/app`)
/// or, when None, from the npm registry. Replaces an earlier install only once the new one is
/// complete.
///
/// # Errors
/// When npm or tar fail, or the package's layout is not the one Kade knows how to patch.
pub fn install(data_dir: &Path, version: &str, tarball: Option<&Path>) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let work = tempfile::Builder::new()
        .prefix(".viewer-install-")
        .tempdir_in(data_dir)
        .context("cannot create a working directory in the data directory")?;
    let tgz = match tarball {
        Some(t) => t.to_owned(),
        None => {
            eprintln!("kade: fetching @ohif/app@{version} from the npm registry…");
            let o = Command::new("npm")
                .args(["pack", "--silent", &format!("@ohif/app@{version}")])
                .current_dir(work.path())
                .output()
                .context("cannot run npm: install Node.js and npm, or pass --from TARBALL")?;
            if !o.status.success() {
                bail!(
                    "npm pack @ohif/app@{version} failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
            }
            let name = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            work.path().join(name)
        }
    };
    eprintln!("kade: unpacking {}…", tgz.display());
    let st = Command::new("tar")
        .arg("xzf")
        .arg(&tgz)
        .arg("-C")
        .arg(work.path())
        .arg("package/dist")
        .status()
        .context("cannot run tar")?;
    if !st.success() {
        bail!(
            "{} is not an @ohif/app package (no package/dist inside)",
            tgz.display()
        );
    }
    let dist = work.path().join("package/dist");
    eprintln!("kade: adapting the viewer to /viewer/ and to Kade's DICOMweb…");
    patch(&dist)?;
    let target = dir(data_dir);
    let old = data_dir.join(".viewer-old");
    let _ = std::fs::remove_dir_all(&old);
    if target.exists() {
        std::fs::rename(&target, &old).context("cannot move the earlier viewer aside")?;
    }
    std::fs::rename(&dist, &target).context("cannot move the viewer into place")?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(target)
}

/// Rewrites a prebuilt OHIF `dist/` for `/viewer/` and adds Kade's configuration and sign-in.
///
/// # Errors
/// When an expected pattern is missing: a newer OHIF build may have changed its layout, and a
/// half-patched viewer would only show a blank page.
pub fn patch(dist: &Path) -> anyhow::Result<()> {
    let index = dist.join("index.html");
    let mut html = std::fs::read_to_string(&index)
        .with_context(|| format!("{} is missing", index.display()))?;
    let mut n = 0;
    for attr in ["href", "src", "content"] {
        let from = format!("{attr}=\"/");
        n += html.matches(&from).count();
        html = html.replace(&from, &format!("{attr}=\"/viewer/"));
    }
    let public = html.matches("PUBLIC_URL=\"/\"").count();
    html = html.replace("PUBLIC_URL=\"/\"", "PUBLIC_URL=\"/viewer/\"");
    if n == 0 || public == 0 {
        bail!(
            "index.html does not have the root paths Kade rewrites ({n} paths, {public} PUBLIC_URL)"
        );
    }
    // The sign-in step runs before anything else on the page.
    let Some(head) = html.find("<head>") else {
        bail!("index.html has no <head>");
    };
    html.insert_str(head + "<head>".len(), SIGN_IN_SCRIPT);
    std::fs::write(&index, html)?;

    let mut bundles = 0;
    let mut app_bundle = false;
    for e in std::fs::read_dir(dist)? {
        let p = e?.path();
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_owned();
        if name.ends_with(".js") {
            let s = std::fs::read_to_string(&p)?;
            const PUBLIC_PATH: &str = "__webpack_require__.p = \"/\";";
            if s.contains(PUBLIC_PATH) {
                std::fs::write(
                    &p,
                    s.replace(PUBLIC_PATH, "__webpack_require__.p = \"/viewer/\";"),
                )?;
                bundles += 1;
                app_bundle |= name.starts_with("app.bundle.");
            }
        } else if name == "app.bundle.css" {
            let s = std::fs::read_to_string(&p)?;
            std::fs::write(&p, s.replace("url(/", "url(/viewer/"))?;
        }
    }
    if !app_bundle {
        bail!("no app bundle with the public path Kade rewrites ({bundles} bundles patched)");
    }
    std::fs::write(dist.join("app-config.js"), APP_CONFIG)?;
    std::fs::write(dist.join("kade-login.html"), LOGIN_PAGE)?;
    Ok(())
}

const SIGN_IN_SCRIPT: &str = r#"<script>
(function () {
  var m = location.hash.match(/[#&]token=([^&]+)/);
  if (m) {
    localStorage.setItem('kade_token', decodeURIComponent(m[1]));
    history.replaceState(null, '', location.pathname + location.search);
  }
  if (!localStorage.getItem('kade_token')) {
    location.replace('/viewer/kade-login.html?next=' + encodeURIComponent(location.pathname + location.search));
  }
})();
</script>"#;

const APP_CONFIG: &str = r#"// Written by `kade viewer install`: OHIF reads Kade's DICOMweb on the same origin, sending
// the token the sign-in step keeps in localStorage ('kade_token').
window.config = function ({ servicesManager }) {
  const kadeAuthHeader = () => {
    const t = window.localStorage.getItem('kade_token');
    return t ? { Authorization: 'Bearer ' + t } : {};
  };
  return {
    routerBasename: '/viewer',
    showStudyList: true,
    extensions: [],
    modes: [],
    customizationService: { 'ohif.tours': { $set: [] } },
    investigationalUseDialog: { option: 'never' },
    maxNumberOfWebWorkers: 2,
    defaultDataSourceName: 'kade',
    dataSources: [{
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'kade',
      configuration: {
        friendlyName: 'Kade', name: 'kade',
        qidoRoot: '/dicom-web', wadoRoot: '/dicom-web', wadoUriRoot: '/dicom-web',
        qidoSupportsIncludeField: true, supportsFuzzyMatching: false, supportsWildcard: true,
        enableStudyLazyLoad: true, imageRendering: 'wadors', thumbnailRendering: 'wadors',
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        onConfiguration: cfg => {
          servicesManager.services.userAuthenticationService
            .setServiceImplementation({ getAuthorizationHeader: kadeAuthHeader });
          return cfg;
        },
      },
    }],
  };
};
"#;

const LOGIN_PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Kade: sign in to the viewer</title>
<style>body{font-family:sans-serif;max-width:32em;margin:4em auto;color:#ddd;background:#111}
textarea{width:100%;height:6em}button{margin-top:1em;padding:.5em 2em}#err{color:#f66}</style></head>
<body><h1>Kade viewer</h1>
<p>Paste your API token (an administrator creates one with <code>kade token create --user NAME</code>).</p>
<form id="f"><textarea id="t" autofocus></textarea><br><button>Open the viewer</button></form>
<p id="err"></p>
<script>
document.getElementById('f').onsubmit = async function (e) {
  e.preventDefault();
  var t = document.getElementById('t').value.trim();
  var r = await fetch('/dicom-web/studies?limit=1', { headers: { Authorization: 'Bearer ' + t } });
  if (r.status === 401) { document.getElementById('err').textContent = 'This token is not valid.'; return; }
  if (r.status === 403) { document.getElementById('err').textContent = 'This token may not view studies.'; return; }
  localStorage.setItem('kade_token', t);
  var next = new URLSearchParams(location.search).get('next') || '/viewer/';
  location.replace(next.indexOf('/viewer/') === 0 ? next : '/viewer/');
};
</script></body></html>
"#;

const NOT_INSTALLED: &str = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<title>Kade</title></head><body><h1>The viewer is not installed</h1><p>Install it on the \
server with <code>kade viewer install</code> (it fetches the OHIF viewer from the npm \
registry), then reload this page.</p></body></html>";

/// Routes `/viewer` and `/viewer/…` to the files in `dir`.
pub fn router(dir: PathBuf) -> Router {
    Router::new()
        .route("/viewer", get(|| async { Redirect::permanent("/viewer/") }))
        .route("/viewer/", get(index))
        .route("/viewer/{*path}", get(file))
        .with_state(dir)
}

async fn index(State(dir): State<PathBuf>) -> Response {
    serve(&dir, "index.html").await
}

async fn file(State(dir): State<PathBuf>, UrlPath(path): UrlPath<String>) -> Response {
    serve(&dir, &path).await
}

async fn serve(dir: &Path, path: &str) -> Response {
    let rel = Path::new(path);
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return (StatusCode::BAD_REQUEST, "bad path").into_response();
    }
    if !dir.join("index.html").is_file() {
        return (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            NOT_INSTALLED,
        )
            .into_response();
    }
    let mut file = dir.join(rel);
    let has_extension = rel.extension().is_some();
    if !has_extension || !file.is_file() {
        if has_extension {
            return (StatusCode::NOT_FOUND, "not found").into_response();
        }
        // A route of the single-page app: its index.html.
        file = dir.join("index.html");
    }
    let bytes = match tokio::fs::read(&file).await {
        Ok(b) => b,
        Err(_) => return (StatusCode::NOT_FOUND, "not found").into_response(),
    };
    let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let mut res = bytes.into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime(name)));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    let cache = if name.ends_with(".html") || name == "app-config.js" {
        "no-cache"
    } else {
        "public, max-age=86400"
    };
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    res
}

fn mime(name: &str) -> &'static str {
    match name.rsplit('.').next().unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "wasm" => "application/wasm",
        "png" => "image/png",
        "svg" => "image/svg+xml",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "woff" => "font/woff",
        "ttf" => "font/ttf",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mini_dist() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("index.html"),
            "<html><head><link href=\"/assets/x.png\"><script>window.PUBLIC_URL=\"/\";</script>\
             <script src=\"/app.bundle.1.js\"></script></head><body></body></html>",
        )
        .unwrap();
        std::fs::write(
            d.path().join("app.bundle.1.js"),
            "x;__webpack_require__.p = \"/\";y",
        )
        .unwrap();
        std::fs::write(d.path().join("app.bundle.css"), "a{src:url(/f.woff2)}").unwrap();
        d
    }

    #[test]
    fn patch_moves_the_app_to_viewer_and_adds_sign_in() {
        let d = mini_dist();
        patch(d.path()).unwrap();
        let html = std::fs::read_to_string(d.path().join("index.html")).unwrap();
        assert!(html.contains("href=\"/viewer/assets/x.png\""));
        assert!(html.contains("src=\"/viewer/app.bundle.1.js\""));
        assert!(html.contains("PUBLIC_URL=\"/viewer/\""));
        assert!(html.find("kade_token").unwrap() < html.find("app.bundle").unwrap());
        let js = std::fs::read_to_string(d.path().join("app.bundle.1.js")).unwrap();
        assert!(js.contains("__webpack_require__.p = \"/viewer/\";"));
        let css = std::fs::read_to_string(d.path().join("app.bundle.css")).unwrap();
        assert_eq!(css, "a{src:url(/viewer/f.woff2)}");
        assert!(d.path().join("app-config.js").is_file());
        assert!(d.path().join("kade-login.html").is_file());
    }

    #[test]
    fn patch_refuses_an_unknown_layout() {
        let d = mini_dist();
        std::fs::write(d.path().join("app.bundle.1.js"), "no public path here").unwrap();
        let e = patch(d.path()).unwrap_err().to_string();
        assert!(e.contains("public path"), "{e}");
    }

    #[tokio::test]
    async fn paths_outside_the_viewer_are_refused() {
        let d = mini_dist();
        let r = serve(d.path(), "../../etc/passwd").await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let r = serve(d.path(), "studies/list").await;
        assert_eq!(r.status(), StatusCode::OK, "SPA routes get index.html");
        let r = serve(d.path(), "missing.js").await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }
}
