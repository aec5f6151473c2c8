import { logger, type Logger } from '../util/log.js';

/** Usually an ObjectRef; a manifest document that is not a known object is named by kind "Document" and its origin. */
export interface IssueRef {
  kind: string;
  namespace: string;
  name: string;
}

const refKey = (r: IssueRef): string => `${r.kind}/${r.namespace}/${r.name}`;
const refString = (r: IssueRef): string => `${r.kind} ${r.namespace ? `${r.namespace}/` : ''}${r.name}`;

/**
 * Where a bad object was caught: `input` when the object itself is malformed
 * (a weight that is not a number, a bad CIDR), `reference` when it points at
 * something that does not exist (a split to a missing service), `source` when
 * a manifest document could not even be read as an object.
 */
export type IssueStage = 'input' | 'reference' | 'source';

export interface ObjectIssue {
  ref: IssueRef;
  stage: IssueStage;
  /** The field at fault, kubectl style: spec.backends[1].weight. */
  field: string;
  message: string;
  /** Where the object came from when known (a manifest file and document index). */
  origin?: string;
  /** Whether an earlier good version of the object stays in force. */
  keptLastGood: boolean;
}

/**
 * Reports bad objects once per distinct problem: a log line naming object and
 * field, a counter per kind, and hooks (the Kubernetes source posts an Event).
 * The same problem seen again on the next compile is not reported again; it is
 * cleared when the object is fixed or deleted.
 */
export class IssueReporter {
  private readonly activeIssues = new Map<string, ObjectIssue>();
  private readonly hooks: ((issue: ObjectIssue) => void)[] = [];
  /** Reports so far, by kind: the metrics module exposes these as a counter. */
  readonly reported = new Map<string, number>();

  constructor(private readonly log: Logger = logger('policy-issues')) {}

  onIssue(hook: (issue: ObjectIssue) => void): void {
    this.hooks.push(hook);
  }

  report(issue: ObjectIssue): void {
    const key = `${issue.stage}:${refKey(issue.ref)}`;
    const prev = this.activeIssues.get(key);
    if (prev && prev.field === issue.field && prev.message === issue.message && prev.keptLastGood === issue.keptLastGood) return;
    this.activeIssues.set(key, issue);
    this.reported.set(issue.ref.kind, (this.reported.get(issue.ref.kind) ?? 0) + 1);
    this.log.warn(
      { object: refString(issue.ref), field: issue.field, stage: issue.stage, origin: issue.origin, keptLastGood: issue.keptLastGood },
      `${refString(issue.ref)}: ${issue.field}: ${issue.message}${issue.keptLastGood ? ' (last good version kept)' : ' (object skipped)'}`,
    );
    for (const hook of this.hooks) hook(issue);
  }

  clear(ref: IssueRef, stage?: IssueStage): void {
    for (const s of stage ? [stage] : (['input', 'reference', 'source'] as const)) this.activeIssues.delete(`${s}:${refKey(ref)}`);
  }

  /** Problems not yet fixed, for status output and tests. */
  active(): ObjectIssue[] {
    return [...this.activeIssues.values()];
  }
}
