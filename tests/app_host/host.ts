// The smallest faithful MCP Apps host for tests/test_app_view.py: the official AppBridge from
// @modelcontextprotocol/ext-apps, a sandbox proxy on a second origin (proxy.html, served with the CSP as an HTTP
// header), and every server request sent through window.mcpRequest, which the test binds to a real Python SDK client
// of a real klein-agent server. Visibility is the host's job (SEP-1865): the view may call only tools whose
// _meta.ui.visibility includes "app" (default ["model", "app"]); the handlers are set after connect(), because
// connect() installs plain forwarding that checks nothing.
import { AppBridge, PostMessageTransport } from "@modelcontextprotocol/ext-apps/app-bridge";

type Json = Record<string, any>;
declare global {
  interface Window {
    mcpRequest(method: string, params: Json): Promise<Json>;
    hostLog: Json[];
    startView(tool: string, args: Json): Promise<void>;
    callFromView?: (name: string, args: Json) => Promise<Json>;
  }
}

window.hostLog = [];

function visibility(tool: Json | undefined): string[] {
  return tool?._meta?.ui?.visibility ?? ["model", "app"];
}

window.startView = async (toolName: string, args: Json) => {
  const tools: Json[] = (await window.mcpRequest("tools/list", {})).tools;
  const tool = tools.find((t) => t.name === toolName);
  const uri = tool?._meta?.ui?.resourceUri;
  if (!uri) throw new Error(`${toolName} names no ui:// view`);
  const read = await window.mcpRequest("resources/read", { uri });
  const resource = read.contents[0];
  window.hostLog.push({ kind: "resource", uri, mimeType: resource.mimeType, bytes: new TextEncoder().encode(resource.text).length });

  document.getElementById("view")?.remove();  // one view at a time: a new result replaces the last
  const iframe = document.createElement("iframe");
  iframe.id = "view";
  document.body.append(iframe);
  const bridge = new AppBridge(
    null,
    { name: "klein-agent-test-host", version: "0" },
    { serverTools: {}, serverResources: {}, updateModelContext: { text: {} }, message: { text: {} } },
    { hostContext: { theme: "light", displayMode: "inline", platform: "web", locale: "en-GB" } },
  );
  const ready = new Promise<void>((r) => (bridge.onsandboxready = () => r()));
  const initialized = new Promise<void>((r) => (bridge.oninitialized = () => r()));
  await bridge.connect(new PostMessageTransport(iframe.contentWindow!, iframe.contentWindow!));

  bridge.oncalltool = async (params) => {
    const known = tools.find((t) => t.name === params.name);
    const allowed = known !== undefined && visibility(known).includes("app");
    window.hostLog.push({ kind: "call", name: params.name, arguments: params.arguments, allowed });
    if (!allowed) throw new Error(`${params.name} is not a tool this view may call`);
    const result = await window.mcpRequest("tools/call", params);
    window.hostLog.push({ kind: "result", name: params.name, isError: !!result.isError });
    return result as any;
  };
  bridge.onreadresource = async (params) => (await window.mcpRequest("resources/read", params)) as any;
  bridge.onupdatemodelcontext = async (params) => {
    window.hostLog.push({ kind: "context", params });
    return {};
  };
  bridge.onmessage = async (params) => {
    window.hostLog.push({ kind: "message", params });
    return {};
  };
  bridge.onsizechange = ({ height }) => {
    if (height) iframe.style.height = `${height}px`;
  };
  // a way for the test to make the view's own bridge carry a call, as a hostile or buggy view would
  window.callFromView = (name, a) => (bridge as any).oncalltool({ name, arguments: a }, {});

  iframe.src = "http://sandbox.test/proxy.html";
  await ready;
  await bridge.sendSandboxResourceReady({ html: resource.text, csp: resource._meta?.ui?.csp });
  await initialized;
  await bridge.sendToolInput({ arguments: args });
  const result = await window.mcpRequest("tools/call", { name: toolName, arguments: args });
  await bridge.sendToolResult(result as any);
  window.hostLog.push({ kind: "started", tool: toolName });
};
